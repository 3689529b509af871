"""BlindDPSPipeline: contract tests (shared mixin) and the maths of one step, with tiny UNets."""

import numpy as np
import pytest
import torch
from conftest import smooth_images, tiny_ddpm, tiny_unet
from pipeline_mixin import PipelineTesterMixin

from diffusers_blind import BlindDPSPipeline
from diffusers_blind.ops import BlurOperator, dps_residual_norm, flip_kernel, motion_kernel
from diffusers_blind.pipelines.blind_dps.pipeline_blind_dps_deblur import BlindDPSProblem, blur_operator
from diffusers_blind.pipelines.pipeline_utils import UNetDenoiser


def components(**scheduler_kwargs):
    return {"unet": tiny_unet(), "kernel_unet": tiny_unet(out_channels=1, in_channels=1, sample_size=8, seed=1),
            "scheduler": tiny_ddpm(**scheduler_kwargs)}


class TestBlindDPSContract(PipelineTesterMixin):
    pipeline_class = BlindDPSPipeline
    extra_bad_inputs = [
        (dict(blur_model="gaussian"), ValueError, "blur_model"),
        (dict(step_size="linear"), ValueError, "step_size"),
        (dict(kernel_size=7), ValueError, "kernel_size"),
        (dict(kernel_size=32), ValueError, r"larger than the image \(16x16\); pass a kernel_size that is a multiple "
                                          r"of 2 and at most 16 \(e.g. 16\)"),
        (dict(boundary_margin=True), ValueError, "boundary_margin"),
        (dict(boundary_margin=2.0), ValueError, "boundary_margin"),
        (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
        (dict(sparsity_weight=float("nan")), ValueError, "sparsity_weight"),
        (dict(num_particles=0), ValueError, "num_particles"),
        (dict(boundary_margin=-2), ValueError, "boundary_margin"),
        (dict(num_inference_steps=1001), ValueError, "num_inference_steps"),
        (dict(latents=torch.zeros(1, 3, 8, 8)), ValueError, "latents must"),
        (dict(kernel_latents=torch.zeros(1, 1, 16, 16)), ValueError, "kernel_latents must"),
    ]

    def get_dummy_components(self):
        return components()

    def get_dummy_inputs(self, seed=0, batch=1):
        generator = [torch.Generator().manual_seed(seed + i) for i in range(batch)] if batch > 1 else (
            torch.Generator().manual_seed(seed))
        return {"image": smooth_images(batch, 3, 16, 16, seed=seed), "num_inference_steps": 3, "kernel_size": 8,
                "generator": generator, "output_type": "np"}


def pipe_with(**scheduler_kwargs):
    pipe = BlindDPSPipeline(**components(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_any_size_grayscale_particles_and_both_latents():
    pipe = pipe_with()
    gray = smooth_images(1, 1, 19, 22)  # canvas: 19 + 2·1 margin → 22 rows, 22 + 2 → 24 columns (multiple of 2)
    g = torch.Generator().manual_seed(0)
    latents, kernel_latents = torch.randn(2, 3, 22, 24, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    outs = [pipe(gray, num_inference_steps=2, num_particles=2, latents=latents, kernel_latents=kernel_latents,
                 boundary_margin=1, output_type="np", generator=torch.Generator().manual_seed(s)) for s in (0, 0)]
    assert outs[0].images.shape == (1, 19, 22, 1) and outs[0].particles.shape == (1, 2, 19, 22, 1)
    assert outs[0].uncertainty.shape == (1, 19, 22) and outs[0].kernels.shape == (1, 8, 8)
    np.testing.assert_array_equal(outs[0].images, outs[1].images)
    np.testing.assert_allclose(outs[0].kernels.sum(), 1.0, atol=1e-5)


def test_respaced_schedule_runs_the_requested_number_of_steps():
    pipe = pipe_with()
    seen = []
    pipe(smooth_images(1, 3, 16, 16), num_inference_steps=4, kernel_size=8, output_type="np",
         callback_on_step_end=lambda p, i, t, d: seen.append(int(t)) or d)
    assert len(seen) == 4 and seen == sorted(seen, reverse=True) and seen[0] > 700


def test_callback_kernel_is_the_sum_one_estimate_in_convolution_convention():
    pipe = pipe_with()
    record = {}

    def keep(p, i, t, tensors):
        record.update(tensors)
        return tensors

    out = pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8, output_type="pt",
               callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["kernel_latents", "kernel"])
    torch.testing.assert_close(record["kernel"].sum(dim=(-2, -1)), torch.ones(1, 1))
    torch.testing.assert_close(out.kernels, record["kernel"])  # the last step's estimate is the output
    corr = pipe.output_kernel(record["kernel_latents"], blur_operator("correlation"))
    conv = pipe.output_kernel(record["kernel_latents"], blur_operator("circular"))
    torch.testing.assert_close(corr, flip_kernel(conv))


def test_step_size_modes():
    pipe = pipe_with()
    pipe._guidance_scale = 0.5
    t = 400
    assert pipe.step_size_at(t, "constant") == 0.5
    assert pipe.step_size_at(t, "sqrt_alpha_bar") == pytest.approx(0.5 * float(pipe.scheduler.alphas_cumprod[t]) ** 0.5)


def test_learned_variance_scheduler_needs_two_kernel_output_channels():
    pipe = pipe_with(variance_type="learned_range")
    pipe.unet = tiny_unet(out_channels=6)
    with pytest.raises(ValueError, match="kernel_unet has 1 output"):
        pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8)
    pipe.kernel_unet = tiny_unet(out_channels=2, in_channels=1, sample_size=8)
    out = pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8, output_type="np")
    assert np.isfinite(out.images).all()


def _toy_problem(blur_model):
    """A blurred smooth image and the predictions of both tiny priors at one timestep, differentiable in x_t, k_t."""
    pipe = pipe_with()
    operator = blur_operator(blur_model)
    x = smooth_images(1, 3, 16, 16, seed=3) * 2 - 1
    y = operator(x, motion_kernel(8, 0.5, generator=0))
    g = torch.Generator().manual_seed(0)
    states = {"latents": torch.randn(1, 3, 16, 16, generator=g), "kernel": torch.randn(1, 1, 8, 8, generator=g)}
    denoisers = {name: UNetDenoiser(unet, pipe.scheduler) for name, unet in pipe.chains().items()}
    return pipe, operator, y, states, denoisers


def _residual(pipe, operator, y, states, denoisers, t):
    preds = {n: denoisers[n](states[n], t) for n in states}
    return dps_residual_norm(y, preds["latents"].x0, *pipe.operator_params(preds), operator=operator)


@pytest.mark.parametrize("blur_model", ["correlation", "circular", "reflect"])
def test_one_joint_gradient_step_on_both_chains_lowers_the_residual(blur_model):
    pipe, operator, y, states, denoisers = _toy_problem(blur_model)
    t = 200
    pipe.scheduler.set_timesteps(1000)
    with torch.enable_grad():
        x_t = {n: s.clone().requires_grad_(True) for n, s in states.items()}
        before = _residual(pipe, operator, y, x_t, denoisers, t)
        grads = torch.autograd.grad(before.sum(), [x_t["latents"], x_t["kernel"]])
    assert all(g.abs().max() > 0 for g in grads)  # the data term reaches both chains
    after = _residual(pipe, operator, y, {"latents": states["latents"] - 1e-3 * grads[0],
                                          "kernel": states["kernel"] - 1e-3 * grads[1]}, denoisers, t)
    kernel_only = _residual(pipe, operator, y, {"latents": states["latents"],
                                                "kernel": states["kernel"] - 1e-3 * grads[1]}, denoisers, t)
    assert after < before and kernel_only < before


def test_pipeline_step_uses_the_joint_gradient_and_sparsity_reaches_the_kernel_chain():
    pipe, operator, y, states, denoisers = _toy_problem("correlation")
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[3]

    def step(sparsity_weight, guidance_scale):
        pipe._guidance_scale = guidance_scale
        problem = BlindDPSProblem(y, operator, "constant", sparsity_weight)
        return pipe.denoising_step(problem, denoisers, dict(states), t, {"generator": torch.Generator().manual_seed(0)})

    unguided, _ = step(0.0, 0.0)
    guided, kernel = step(0.0, 1.0)
    sparse, _ = step(5.0, 1.0)
    assert (guided["latents"] - unguided["latents"]).abs().max() > 0
    assert (guided["kernel"] - unguided["kernel"]).abs().max() > 0
    # the ℓ1 prior on the unnormalised kernel lowers the kernel chain (towards the -1 background)
    assert (sparse["kernel"] - guided["kernel"]).mean() < 0
    torch.testing.assert_close(sparse["latents"], guided["latents"])
    torch.testing.assert_close(kernel[0].sum(dim=(-2, -1)), torch.ones(1, 1))


class Prediction:
    def __init__(self, x0):
        self.x0 = x0


def test_batch_of_two_kernels_is_normalised_per_element():
    pipe = BlindDPSPipeline(**components(), kernel_background="none")  # the public code's map u / Σu
    raw = torch.stack([torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 0.0)])
    raw[0, 0, 4, 4] = 1.0
    (kernel,) = pipe.operator_params({"kernel": Prediction(raw)})
    torch.testing.assert_close(kernel.sum(dim=(-2, -1)), torch.ones(2, 1))
    assert kernel[0, 0, 4, 4] == 1.0 and torch.allclose(kernel[1], torch.full((1, 8, 8), 1 / 64))


def test_default_median_background_removes_a_grey_pedestal_per_element():
    pipe = pipe_with()
    assert pipe.config.kernel_background == "median"
    raw = torch.full((2, 1, 8, 8), -1.0)
    raw[1] = -0.5  # second kernel: a grey background that u / Σu would turn into most of the mass
    raw[:, 0, 3, 2:6] = 1.0
    (kernel,) = pipe.operator_params({"kernel": Prediction(raw)})
    torch.testing.assert_close(kernel[0], kernel[1])
    assert torch.allclose(kernel[0, 0, 3, 2:6], torch.full((4,), 0.25))
    pipe.register_to_config(kernel_background="mean")
    with pytest.raises(ValueError, match="kernel_background"):
        pipe(smooth_images(1, 3, 16, 16), num_inference_steps=1, kernel_size=8)


def test_save_load_keeps_both_unets_and_the_config(tmp_path):
    pipe = pipe_with()
    pipe.register_to_config(guidance_scale=2.5, sparsity_weight=0.25)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "kernel_unet" / "config.json").is_file() and (tmp_path / "unet" / "config.json").is_file()
    loaded = BlindDPSPipeline.from_pretrained(tmp_path)
    assert loaded.config.guidance_scale == 2.5 and loaded.config.sparsity_weight == 0.25
    assert loaded.kernel_unet.config.in_channels == 1
    for a, b in zip(pipe.kernel_unet.parameters(), loaded.kernel_unet.parameters()):
        torch.testing.assert_close(a, b)


def test_numpy_integer_arguments_run_like_ints():
    pipe = pipe_with()
    a = pipe(smooth_images(1, 3, 16, 16), boundary_margin=np.int64(4), num_inference_steps=np.int64(2),
             num_particles=np.int32(1), kernel_size=np.int64(8), output_type="np", generator=torch.Generator().manual_seed(0))
    b = pipe(smooth_images(1, 3, 16, 16), boundary_margin=4, num_inference_steps=2, num_particles=1, kernel_size=8,
             output_type="np", generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.kernels, b.kernels)


def test_an_image_smaller_than_the_size_multiple_says_how_large_it_must_be():
    from diffusers import UNet2DModel

    kernel_unet = UNet2DModel(block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=4, sample_size=8,
                              in_channels=1, out_channels=1, down_block_types=("DownBlock2D",) * 4,
                              up_block_types=("UpBlock2D",) * 4)  # 3 downsamplings: sizes are multiples of 8
    pipe = BlindDPSPipeline(tiny_unet(), kernel_unet, tiny_ddpm())
    with pytest.raises(ValueError, match="the image must be at least 8 px a side"):
        pipe(smooth_images(1, 3, 6, 6), num_inference_steps=2, output_type="np")


def test_non_finite_latents_and_a_diverging_run_give_clear_errors():
    pipe = pipe_with()
    image = smooth_images(1, 3, 16, 16)
    with pytest.raises(ValueError, match="latents contains NaN"):
        pipe(image, num_inference_steps=2, kernel_size=8, boundary_margin=0, latents=torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="kernel_latents contains NaN"):
        pipe(image, num_inference_steps=2, kernel_size=8, kernel_latents=torch.full((1, 1, 8, 8), float("inf")))
    for seed in range(6):  # was a kernel-projection error from inside the loop (on some seeds even after a first fix)
        with pytest.raises(RuntimeError, match="diverged"):
            pipe(image, num_inference_steps=3, kernel_size=8, guidance_scale=1e30,
                 generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheduler_name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_a_scheduler_without_the_ddpm_step_is_refused(scheduler_name):
    import diffusers

    pipe = pipe_with()
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler.config)
    with pytest.raises(TypeError, match="DDPMScheduler or a DDIMScheduler"):
        pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8)


def test_a_square_pair_sample_size_of_the_kernel_prior_is_the_default_kernel_size():
    parts = components()
    parts["kernel_unet"].register_to_config(sample_size=(8, 8))
    pipe = BlindDPSPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(smooth_images(1, 3, 16, 16), num_inference_steps=1, output_type="np").kernels.shape == (1, 8, 8)
    parts["kernel_unet"].register_to_config(sample_size=(8, 6))
    with pytest.raises(ValueError, match="not square: pass kernel_size"):
        pipe(smooth_images(1, 3, 16, 16), num_inference_steps=1)


def test_bfloat16_precision_runs_both_unets_under_autocast_and_keeps_the_chains_float32():
    pipe = pipe_with()
    seen = []
    for unet in (pipe.unet, pipe.kernel_unet):
        unet.register_forward_hook(lambda module, args, out: seen.append(torch.is_autocast_enabled("cpu")))
    image = smooth_images(1, 3, 16, 16)

    def run(**kwargs):
        return pipe(image, num_inference_steps=3, kernel_size=8, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **kwargs)

    full = run()
    assert seen and not any(seen)
    seen.clear()
    half = run(precision="bf16")
    assert len(seen) == 6 and all(seen)  # 3 steps × 2 chains
    assert half.images.dtype == half.kernels.dtype == torch.float32
    difference = (full.images - half.images).abs().mean()
    assert 0 < difference < 0.05
    with pytest.raises(ValueError, match="precision"):
        run(precision="int8")
