"""KernelDenoiser: architecture, config round trip and the input-scale semantics."""

import pytest
import torch

from diffusers_blind.models import KernelDenoiser


def conv_parameter_count(widths):
    """Weights (3×3) plus biases of a chain of convolutions with channel ``widths``."""
    return sum(9 * c_in * c_out + c_out for c_in, c_out in zip(widths[:-1], widths[1:]))


def test_default_parameter_count_is_the_reference_fdncnn():
    model = KernelDenoiser()
    assert sum(p.numel() for p in model.parameters()) == 28_641
    assert sum(p.numel() for p in model.parameters()) == conv_parameter_count([2, 32, 32, 32, 32, 1])
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and all(c.bias is not None and c.kernel_size == (3, 3) for c in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("hidden, layers", [(16, 3), (8, 2), (24, 6)])
def test_parameter_count_of_other_configs(hidden, layers):
    model = KernelDenoiser(hidden_channels=hidden, num_layers=layers)
    widths = [2] + [hidden] * (layers - 1) + [1]
    assert sum(p.numel() for p in model.parameters()) == conv_parameter_count(widths)


@pytest.mark.parametrize("layers", [1, 0, -3])
def test_num_layers_below_two_is_an_error(layers):
    with pytest.raises(ValueError, match="num_layers"):
        KernelDenoiser(num_layers=layers)


@pytest.mark.parametrize("size", [9, 16, 33])
def test_output_shape_and_sigma_forms(size, device, dtype):
    torch.manual_seed(0)
    model = KernelDenoiser().to(device, dtype)
    kernels = torch.rand(3, 1, size, size, device=device, dtype=dtype)
    out = model(kernels, 0.01)
    assert out.shape == kernels.shape and out.dtype == dtype and out.device.type == device.type
    # a float, a 0-d tensor and a (B,) tensor of equal values give the same output
    torch.testing.assert_close(model(kernels, torch.tensor(0.01)), out)
    torch.testing.assert_close(model(kernels, torch.full((3,), 0.01, dtype=dtype, device=device)), out)


def test_per_sample_sigma_is_the_constant_second_channel(device):
    torch.manual_seed(1)
    model = KernelDenoiser().double().to(device)
    kernels = torch.rand(2, 1, 11, 11, dtype=torch.float64, device=device)
    sigma = torch.tensor([0.003, 0.05], dtype=torch.float64, device=device)
    out = model(kernels, sigma)
    for b in range(2):
        torch.testing.assert_close(out[b : b + 1], model(kernels[b : b + 1], float(sigma[b])))
    # σ really enters the network
    assert not torch.allclose(out[0], model(kernels[:1], 0.05)[0])
    # and it is exactly a constant input channel of the first convolution
    body_input = torch.cat([kernels, sigma.view(2, 1, 1, 1).expand(2, 1, 11, 11)], dim=1)
    torch.testing.assert_close(out, model.body(body_input))


def test_receptive_field_is_11x11_for_five_layers():
    torch.manual_seed(2)
    model = KernelDenoiser().double()
    kernel = torch.rand(1, 1, 21, 21, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(kernel, 0.01)[0, 0, 10, 10], kernel)
    support = grad[0, 0].abs() > 0
    rows = support.any(1).nonzero().flatten()
    cols = support.any(0).nonzero().flatten()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 15, 5, 15)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(3)
    model = KernelDenoiser(hidden_channels=8, num_layers=4, input_scale=25.0)
    model.save_pretrained(tmp_path)
    loaded = KernelDenoiser.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    assert loaded.config.input_scale == 25.0 and loaded.config.num_layers == 4
    kernels = torch.rand(2, 1, 9, 9)
    torch.testing.assert_close(loaded(kernels, 0.02), model(kernels, 0.02))
    torch.manual_seed(4)
    fresh = KernelDenoiser(hidden_channels=8, num_layers=4, input_scale=25.0)
    assert not torch.allclose(fresh(kernels, 0.02), model(kernels, 0.02))


@pytest.mark.parametrize("scale", [4.0, 1089.0])
def test_input_scale_is_a_change_of_units(scale, dtype):
    """``D_s(k, σ) = f(s·k, s·σ) / s``: with biases multiplied by ``s`` it is the unscaled network exactly.

    (ReLU networks are positively homogeneous once every bias is scaled with the input.)
    """
    torch.manual_seed(5)
    base = KernelDenoiser(input_scale=1.0).to(dtype)
    scaled = KernelDenoiser(input_scale=scale).to(dtype)
    state = {name: value * scale if name.endswith("bias") else value for name, value in base.state_dict().items()}
    scaled.load_state_dict(state)
    kernels = torch.rand(2, 1, 13, 13, dtype=dtype) / 100
    sigma = torch.tensor([0.002, 0.01], dtype=dtype)
    tol = {"atol": 1e-6, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-14, "rtol": 1e-10}
    torch.testing.assert_close(scaled(kernels, sigma), base(kernels, sigma), **tol)

    # with the same weights, the scaled model is the base model evaluated in the other units
    same = KernelDenoiser(input_scale=scale).to(dtype)
    same.load_state_dict(base.state_dict())
    torch.testing.assert_close(same(kernels, sigma), base(kernels * scale, sigma * scale) / scale, **tol)
    assert not torch.allclose(same(kernels, sigma), base(kernels, sigma), **tol)


def test_gradients_reach_every_parameter():
    torch.manual_seed(6)
    model = KernelDenoiser()
    out = model(torch.rand(2, 1, 9, 9), 0.01)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bad_configs_and_inputs_are_refused_clearly():
    for kwargs, match in ((dict(hidden_channels=0), "hidden_channels"), (dict(input_scale=-1.0), "input_scale"),
                          (dict(input_scale=0), "input_scale")):
        with pytest.raises(ValueError, match=match):
            KernelDenoiser(**kwargs)
    denoiser = KernelDenoiser(hidden_channels=4, num_layers=2)
    kernels = torch.rand(2, 1, 5, 5)
    for args, match in (((kernels, -0.1), "sigma must be finite"), ((kernels, torch.tensor([0.1, 0.2, 0.3])), "one per kernel"),
                        ((kernels[:, 0], 0.1), r"\(B, 1, k, k\)")):
        with pytest.raises(ValueError, match=match):
            denoiser(*args)
