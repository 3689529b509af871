"""The shared pipeline parts: the UNet → (ε, x̂0) adapter and the output base class."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from diffusers_blind import DeblurPipelineOutput, FastEMDeblurPipelineOutput, KernelEstimator
from diffusers_blind.pipelines.pipeline_utils import UNetDenoiser, to_unit_range


def unet(out_channels=3):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1, out_channels=out_channels,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    )


def x_t():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
def test_epsilon_and_x0_agree_with_the_scheduler(prediction_type, scheduler_class):
    scheduler = scheduler_class(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    denoiser = UNetDenoiser(unet(), scheduler)
    x, t = x_t(), scheduler.timesteps[3]
    stepped = denoiser(x, t, step=True, **denoiser.step_kwargs(torch.Generator().manual_seed(0)))
    plain = denoiser(x, t)
    assert plain.prev_sample is None and stepped.prev_sample.shape == x.shape
    torch.testing.assert_close(plain.x0, stepped.x0, atol=1e-4, rtol=1e-4)  # Tweedie = the scheduler's x̂0
    torch.testing.assert_close(stepped.epsilon, plain.epsilon)
    alpha_bar = scheduler.alphas_cumprod[int(t)]
    torch.testing.assert_close(alpha_bar.sqrt() * plain.x0 + (1 - alpha_bar).sqrt() * plain.epsilon, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variance_type, kept", [("fixed_small", 3), ("learned_range", 6), ("learned", 6)])
def test_six_channel_unet_keeps_variance_only_when_the_scheduler_learns_it(variance_type, kept):
    scheduler = DDPMScheduler(variance_type=variance_type)
    scheduler.set_timesteps(10)
    model = unet(out_channels=6)
    denoiser = UNetDenoiser(model, scheduler)
    x, t = x_t(), scheduler.timesteps[0]
    prediction = denoiser(x, t, step=True, generator=torch.Generator().manual_seed(0))
    assert prediction.model_output.shape[1] == kept and prediction.epsilon.shape == x.shape
    torch.testing.assert_close(prediction.epsilon, model(x, t).sample[:, :3])
    if variance_type != "learned":  # "learned" reads the raw channels as a variance: NaN for a random UNet
        assert torch.isfinite(prediction.prev_sample).all()


def test_ddim_drops_variance_channels_and_takes_eta():
    scheduler = DDIMScheduler()
    denoiser = UNetDenoiser(unet(out_channels=6), scheduler)
    assert set(denoiser.step_kwargs(None, eta=0.5)) == {"generator", "eta"}
    scheduler.set_timesteps(5)
    assert denoiser(x_t(), scheduler.timesteps[0]).model_output.shape[1] == 3


def test_unexpected_channel_count_is_an_error():
    denoiser = UNetDenoiser(unet(out_channels=4), DDPMScheduler())
    with pytest.raises(ValueError, match="channels"):
        denoiser(x_t(), 10)


def test_adapter_is_differentiable_in_x_t():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    x = x_t().requires_grad_(True)
    x0 = to_unit_range(UNetDenoiser(unet(), scheduler)(x, scheduler.timesteps[5]).x0)
    (grad,) = torch.autograd.grad(x0.sum(), x)
    assert grad.abs().sum() > 0


def test_output_base_allows_no_kernel_and_fast_em_output_is_one():
    out = DeblurPipelineOutput(images=np.zeros((1, 4, 4, 3)))
    assert out.kernels is None and "kernels" not in out.keys() and len(out.to_tuple()) == 1
    fast = FastEMDeblurPipelineOutput(np.zeros((1, 4, 4, 3)), np.ones((1, 3, 3)) / 9)
    assert isinstance(fast, DeblurPipelineOutput) and fast.kernels.shape == (1, 3, 3)


@pytest.mark.parametrize("bad", [1e9, 10**6, 2.5, True, 0])
def test_estimator_refuses_absurd_iteration_counts(bad):
    with pytest.raises(ValueError, match="num_iterations"):
        KernelEstimator(num_iterations=bad)
    with pytest.raises(ValueError, match="num_iterations"):
        KernelEstimator.from_config({"num_iterations": bad, "regularization": "l1"})


@pytest.mark.parametrize("regularization", ["l1", "l2", "none"])
def test_parameter_free_estimator_has_a_device_and_dtype(regularization):
    estimator = KernelEstimator(regularization=regularization).to(torch.float64)
    assert estimator.device == torch.device("cpu") and estimator.dtype == torch.float64


def test_generator_list_of_the_wrong_length_says_what_it_expects():
    from diffusers_blind.pipelines.pipeline_utils import expand_generator

    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(ValueError, match=r"expected 2 \(one per image\) or 4 \(one per copy\)"):
        expand_generator(gens, 2, 2)
    with pytest.raises(ValueError, match=r"entries; expected 2$"):
        expand_generator(gens, 2, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("out_channels, variance_type", [(3, "fixed_small"), (6, "learned_range")])
def test_output_from_epsilon_inverts_epsilon_from_output(prediction_type, out_channels, variance_type):
    """A corrected ε goes back into the scheduler as a UNet output of the same layout (variance channels kept)."""
    scheduler = DDPMScheduler(prediction_type=prediction_type, variance_type=variance_type)
    scheduler.set_timesteps(10)
    denoiser = UNetDenoiser(unet(out_channels=out_channels), scheduler)
    x, t = x_t(), scheduler.timesteps[4]
    output = denoiser.model_output(x, t)
    epsilon = denoiser.epsilon_from_output(output, x, t)
    rebuilt = denoiser.output_from_epsilon(epsilon, x, t, output)
    torch.testing.assert_close(rebuilt, output, atol=1e-4, rtol=1e-4)
    other = torch.randn_like(epsilon)
    torch.testing.assert_close(denoiser.epsilon_from_output(denoiser.output_from_epsilon(other, x, t, output), x, t),
                               other, atol=1e-4, rtol=1e-4)


def test_epsilon_from_x0_makes_that_x0_the_tweedie_estimate():
    scheduler = DDPMScheduler()
    denoiser = UNetDenoiser(unet(), scheduler)
    x, t = x_t(), 600
    x0 = torch.rand_like(x) * 2 - 1
    torch.testing.assert_close(denoiser.x0_from_epsilon(denoiser.epsilon_from_x0(x0, x, t), x, t), x0,
                               atol=1e-5, rtol=1e-5)


def test_callback_replacements_keep_shape_and_dtype_and_refuse_the_rest():
    from diffusers_blind.pipelines.pipeline_utils import callback_outputs, callback_replacement, check_generator

    current = torch.zeros(2, 3, 4, 4)
    assert callback_outputs(None) == {}
    with pytest.raises(TypeError, match="dict of tensors"):
        callback_outputs([current])
    outputs = {"latents": torch.ones(2, 3, 4, 4, dtype=torch.float64)}
    replaced = callback_replacement(outputs, "latents", current)
    assert replaced.dtype == torch.float32 and float(replaced.sum()) == 96 and "latents" not in outputs
    assert callback_replacement({}, "latents", current) is current
    with pytest.raises(ValueError, match="must keep"):
        callback_replacement({"latents": torch.ones(1, 3, 4, 4)}, "latents", current)
    with pytest.raises(ValueError, match="NaN"):
        callback_replacement({"latents": torch.full((2, 3, 4, 4), float("inf"))}, "latents", current)
    check_generator(None)
    check_generator([torch.Generator()])
    with pytest.raises(TypeError, match="manual_seed"):
        check_generator([torch.Generator(), 3])
