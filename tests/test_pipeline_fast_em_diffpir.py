"""Fast EM with DiffPIR's E-step (``guidance="diffpir"``): a data step on x̂0, forward passes only."""

import numpy as np
import pytest
import torch
from conftest import smooth_images, tiny_ddpm, tiny_unet

from diffusers_blind import FastEMDeblurPipeline, KernelEstimator
from diffusers_blind.ops import fft_blur, gaussian_kernel
from diffusers_blind.pipelines.fast_em.pipeline_fast_em_deblur import DIFFPIR_GUIDANCE_SCALE, FastEMProblem


def make_pipe():
    torch.manual_seed(0)
    pipe = FastEMDeblurPipeline(tiny_unet(), tiny_ddpm(), KernelEstimator(kernel_size=5, num_iterations=2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, image, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("guard", False)
    return pipe(image, generator=torch.Generator().manual_seed(seed), guidance="diffpir", **kwargs)


def kernel_4d(size=5, std=1.0):
    return gaussian_kernel(size, std).reshape(1, 1, size, size)


def problem_for(y, sigma, observed=None, iterations=0):
    return FastEMProblem(measurement=y, sigma=torch.tensor([sigma]), taper_window=torch.ones(1, 1, *y.shape[-2:]),
                         num_particles=1, guidance="diffpir", r_schedule="fastem", estimate_kernel=False,
                         observed=observed, guidance_iterations=iterations)


def data_step(pipe, problem, x0, kernel, scale=1.0, step_index=2):
    pipe.scheduler.set_timesteps(10)
    pipe._guidance_scale = scale
    return pipe.proximal_x0(problem, x0, kernel, step_index)


def rho_squared(pipe, step_index, scale):
    alpha_bar = float(pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[step_index])])
    return scale * (1 - alpha_bar) / 4


def test_data_step_is_the_fourier_map_estimate_for_the_circular_blur():
    """``x̃0 = argmin ‖y − k ⊛ x‖²/σ² + ‖x − x̂0‖²/ρ²``: in Fourier ``(K̄Y/σ² + X̂0/ρ²) / (|K|²/σ² + 1/ρ²)``."""
    pipe = make_pipe()
    truth = smooth_images(1, height=16, width=16)
    kernel, sigma = kernel_4d(), 0.05
    y = fft_blur(truth, kernel)
    x0 = (0.8 * truth + 0.1).clamp(0, 1)  # a dimmed guess, well inside [0, 1]
    step_index, scale = 6, 0.02  # late, small weight: the answer stays inside [0, 1], the clamp does nothing
    out = data_step(pipe, problem_for(y, sigma), x0, kernel, scale, step_index)
    rho2 = rho_squared(pipe, step_index, scale)
    from diffusers_blind.ops.blur import p2o

    otf = p2o(kernel, (16, 16))
    expected = torch.fft.ifft2((otf.conj() * torch.fft.fft2(y) / sigma**2 + torch.fft.fft2(x0) / rho2)
                               / (otf.abs().square() / sigma**2 + 1 / rho2)).real
    assert 0 < expected.min() and expected.max() < 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert (out - x0).abs().max() > 1e-3  # it moved


def test_masked_data_step_solves_the_normal_equations_of_the_valid_blur():
    """With a 0/1 mask ``W``: ``KᵀW(Kx − y)/σ² + (x − x̂0)/ρ² = 0`` at the solution (conjugate gradients)."""
    pipe = make_pipe()
    truth = smooth_images(1, height=24, width=24, seed=3)
    kernel, sigma = kernel_4d(), 0.05
    observed = torch.zeros(1, 1, 24, 24)
    observed[..., 4:20, 4:20] = 1
    y = observed * fft_blur(truth, kernel)
    x0 = (0.7 * truth + 0.15).clamp(0, 1)
    step_index, scale = 4, 0.2
    out = data_step(pipe, problem_for(y, sigma, observed, iterations=200), x0, kernel, scale, step_index)
    rho2 = rho_squared(pipe, step_index, scale)
    from diffusers_blind.ops.blur import p2o

    otf = p2o(kernel, (24, 24))

    def blur(x, conj=False):
        return torch.fft.ifft2((otf.conj() if conj else otf) * torch.fft.fft2(x)).real

    gradient = blur(observed * (blur(out) - y), conj=True) / sigma**2 + (out - x0) / rho2
    start = blur(observed * (blur(x0) - y), conj=True) / sigma**2
    assert gradient.norm() < 1e-3 * start.norm()
    residual = lambda x: (observed * (y - blur(x))).norm()  # noqa: E731
    assert residual(out) < 0.5 * residual(x0)


def test_zero_scale_is_the_unguided_sampler():
    """``s = 0``: no data step; the scheduler then steps from the UNet's own x̂0 clamped to the image range, which is
    Pi-GDM at scale 0 when the scheduler clips its x̂0 too (``clip_sample``, as the shipped scheduler does)."""
    pipe = make_pipe()
    image = smooth_images(1)
    kernel = gaussian_kernel(5, 1.0)
    unguided = pipe(image, kernel=kernel, guidance="pigdm", guidance_scale=0.0, num_inference_steps=4,
                    output_type="np", generator=torch.Generator().manual_seed(0))
    diffpir = run(pipe, image, kernel=kernel, guidance_scale=0.0, num_inference_steps=4)
    np.testing.assert_allclose(diffpir.images, unguided.images, atol=1e-4)  # ε → x̂0 round trip
    guided = run(pipe, image, kernel=kernel, guidance_scale=0.5, num_inference_steps=4)
    assert np.abs(guided.images - unguided.images).max() > 1e-3


def test_never_differentiates_through_the_unet_and_keeps_no_graph():
    pipe = make_pipe()
    grad_modes = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: grad_modes.append(torch.is_grad_enabled()))
    graphs = []

    def inspect(p, step, timestep, tensors):
        graphs.append((tensors["latents"].grad_fn, tensors["kernel"].grad_fn, tensors["x0"].grad_fn))
        return tensors

    try:
        out = run(pipe, smooth_images(1), num_inference_steps=4, callback_on_step_end=inspect,
                  callback_on_step_end_tensor_inputs=["latents", "kernel", "x0"])
    finally:
        hook.remove()
    assert grad_modes == [False] * 4
    assert graphs == [(None, None, None)] * 4
    assert np.isfinite(out.images).all() and out.kernels.shape == (1, 5, 5)
    np.testing.assert_allclose(out.kernels.sum(), 1.0, atol=1e-5)
    grad_modes.clear()
    hook = pipe.unet.register_forward_hook(lambda module, args, output: grad_modes.append(torch.is_grad_enabled()))
    try:
        pipe(smooth_images(1), num_inference_steps=2, output_type="np", guard=False)  # Pi-GDM needs the Jacobian
    finally:
        hook.remove()
    assert grad_modes == [True] * 2


def test_seeded_runs_repeat_and_seeds_differ():
    pipe = make_pipe()
    image = smooth_images(1)
    first, again, other = run(pipe, image), run(pipe, image), run(pipe, image, seed=1)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.kernels, again.kernels)
    assert np.abs(first.images - other.images).max() > 1e-4


def test_reads_its_own_default_scale():
    pipe = make_pipe()
    seen = []

    def record(p, step, timestep, tensors):
        seen.append(p.guidance_scale)
        return tensors

    run(pipe, smooth_images(1), callback_on_step_end=record)
    assert seen == [DIFFPIR_GUIDANCE_SCALE] * 3  # not Pi-GDM's guidance_scale
    pipe.register_to_config(diffpir_guidance_scale=0.25)
    seen.clear()
    run(pipe, smooth_images(1), callback_on_step_end=record)
    assert seen == [0.25] * 3
    assert pipe.default_guidance_scale("pigdm") == pipe.config.guidance_scale


@pytest.mark.parametrize("kwargs", [dict(num_particles=2), dict(em_iterations=2), dict(strength=0.5),
                                    dict(kernel=gaussian_kernel(5, 1.0))])
def test_runs_with_the_pipelines_other_modes(kwargs):
    out = run(make_pipe(), smooth_images(2), **kwargs)
    assert out.images.shape == (2, 20, 24, 3) and np.isfinite(out.images).all()


@pytest.mark.parametrize("guidance", ["pigdm", "diffpir"])
def test_a_half_precision_unet_keeps_its_dtype_through_the_steps(guidance):
    """A UNet loaded in bfloat16: the data step and the M-step run in float32, the latents stay in the UNet's dtype."""
    pipe = make_pipe()
    pipe.unet.to(torch.bfloat16)
    dtypes = []

    def record(p, step, timestep, tensors):
        dtypes.append(tensors["latents"].dtype)
        return tensors

    out = pipe(smooth_images(1), guidance=guidance, num_inference_steps=3, output_type="np", guard=False,
               generator=torch.Generator().manual_seed(0), callback_on_step_end=record)
    assert dtypes == [torch.bfloat16] * 3 and np.isfinite(out.images).all()
