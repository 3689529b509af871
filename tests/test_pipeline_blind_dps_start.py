"""BlindDPSPipeline with a start kernel (``kernel_init``, ``kernel_strength``): the hold, the sparse start, errors."""

import numpy as np
import pytest
import torch
from conftest import smooth_images, tiny_unet
from test_pipeline_blind_dps import components, pipe_with

from diffusers_blind import BlindDPSPipeline, BlindDPSTurbulencePipeline
from diffusers_blind.models import KernelEstimator
from diffusers_blind.ops import BlurOperator, flip_kernel, kernel_to_model_range, motion_kernel
from diffusers_blind.pipelines.blind_dps.pipeline_blind_dps_deblur import KERNEL_INITS, blur_operator


def line_kernel(size=8):
    kernel = torch.zeros(1, 1, size, size)
    kernel[0, 0, size // 2, 1: size - 1] = 1.0
    kernel[0, 0, size // 2 - 1, 1] = 2.0  # asymmetric: a flip is visible
    return kernel / kernel.sum()


def record_states(pipe, image, steps, **kwargs):
    """The image and kernel chain states after every step, as the step-end callback sees them."""
    seen = []

    def keep(p, i, t, tensors):
        seen.append({name: tensor.clone() for name, tensor in tensors.items()})
        return {}

    pipe(image, num_inference_steps=steps, kernel_size=8, output_type="pt", callback_on_step_end=keep,
         callback_on_step_end_tensor_inputs=["latents", "kernel_latents"], **kwargs)
    return seen


def test_held_kernel_chain_is_the_start_kernel_diffused_to_the_next_timestep():
    pipe = pipe_with()
    start = line_kernel()
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    seen = record_states(pipe, smooth_images(1, 3, 16, 16), 4, kernel_init=start, kernel_strength=0.5,
                         kernel_latents=noise, blur_model="reflect", generator=torch.Generator().manual_seed(0))
    timesteps = pipe.scheduler.timesteps
    mapped = kernel_to_model_range(start)
    for i in range(2):  # hold = (1 − 0.5)·4 = 2 steps
        alpha_bar = float(pipe.scheduler.alphas_cumprod[int(timesteps[i + 1])])
        expected = alpha_bar ** 0.5 * mapped + (1 - alpha_bar) ** 0.5 * noise
        torch.testing.assert_close(seen[i]["kernel_latents"], expected)
    assert not torch.allclose(seen[2]["kernel_latents"], seen[1]["kernel_latents"], atol=1e-3)  # the chain runs


def pipe_with_kernel_prior(seed: int) -> BlindDPSPipeline:
    parts = components()
    parts["kernel_unet"] = tiny_unet(out_channels=1, in_channels=1, sample_size=8, seed=seed)
    pipe = BlindDPSPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_held_steps_guide_the_image_with_the_start_kernel_not_the_kernel_prior():
    """During the hold the kernel UNet takes no part: two kernel priors give the same image chain until it ends."""
    image = smooth_images(1, 3, 16, 16)
    runs = [record_states(pipe_with_kernel_prior(seed), image, 4, kernel_init=line_kernel(), kernel_strength=0.5,
                          generator=torch.Generator().manual_seed(0)) for seed in (1, 2)]
    for i in range(2):
        torch.testing.assert_close(runs[0][i]["latents"], runs[1][i]["latents"])
    assert not torch.allclose(runs[0][3]["latents"], runs[1][3]["latents"])
    # with the paper's start both priors act from the first step
    noise_runs = [record_states(pipe_with_kernel_prior(seed), image, 2, kernel_init="noise",
                                generator=torch.Generator().manual_seed(0)) for seed in (1, 2)]
    assert not torch.allclose(noise_runs[0][0]["latents"], noise_runs[1][0]["latents"])


def test_the_kernel_chain_runs_at_least_one_step():
    pipe = pipe_with()
    seen = record_states(pipe, smooth_images(1, 3, 16, 16), 3, kernel_init=line_kernel(), kernel_strength=1e-3,
                         generator=torch.Generator().manual_seed(0))
    assert len(seen) == 3
    noise_level = 1 - float(pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[2])])
    assert noise_level < 0.5  # the last held state is the start kernel nearly clean; the final step still ran


def test_start_kernel_is_flipped_for_the_correlation_model():
    pipe = pipe_with()
    start, y = line_kernel(), smooth_images(1, 3, 16, 16)
    noise = torch.full((1,), 10 / 255)
    torch.testing.assert_close(pipe.start_kernel(y, start, 8, noise, blur_operator("correlation")), flip_kernel(start))
    torch.testing.assert_close(pipe.start_kernel(y, start, 8, noise, blur_operator("reflect")), start)
    torch.testing.assert_close(pipe.start_kernel(y, 3 * start[0, 0].numpy(), 8, noise, blur_operator("reflect")), start)


@pytest.mark.parametrize("side", [40, 8])  # room for an 9 px estimate; only for a 7 px one, zero-padded
def test_sparse_start_kernel_has_the_even_size_centred_at_k_over_2(side):
    parts = components()
    pipe = BlindDPSPipeline(**parts, kernel_estimator=KernelEstimator(kernel_size=9, num_iterations=3,
                                                                      regularization="l1"))
    sharp = smooth_images(1, 3, side + 8, side + 8, seed=4)
    true = motion_kernel(7, 0.5, generator=0)
    blurry = BlurOperator("reflect")(sharp, true)[..., 4:-4, 4:-4]
    kernel = pipe.sparse_start_kernel(blurry, 8, torch.full((1,), 2 / 255))
    assert kernel.shape == (1, 1, 8, 8) and (kernel >= 0).all()
    torch.testing.assert_close(kernel.sum(), torch.tensor(1.0))
    if side == 8:
        assert kernel[0, 0, 0].sum() == 0 and kernel[0, 0, :, 0].sum() == 0  # the padded row and column
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    centre = ((kernel[0, 0] * rows).sum(), (kernel[0, 0] * cols).sum())
    assert abs(float(centre[0]) - 4) < 1.5 and abs(float(centre[1]) - 4) < 1.5


def test_sparse_start_runs_end_to_end_and_reports_its_noise_level():
    pipe = BlindDPSPipeline(**components(), kernel_estimator=KernelEstimator(kernel_size=9, num_iterations=2,
                                                                             regularization="l1"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8, kernel_init="sparse",
               kernel_strength=0.5, sigma=7, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.kernels.shape == (1, 8, 8) and out.sigma == [7.0]
    auto = pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8, kernel_init="sparse",
                kernel_strength=0.5, output_type="np", generator=torch.Generator().manual_seed(0))
    assert auto.sigma is not None and 0 < auto.sigma[0] < 255
    assert pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8, output_type="np").sigma is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_init="sparse"), "kernel_estimator component"),
    (dict(kernel_init="dirac"), "kernel_init must be one of"),
    (dict(kernel_strength=0.5), "kernel_init='noise' has none"),
    (dict(kernel_init=line_kernel(), kernel_strength=0.0), r"kernel_strength must be a number in \(0, 1\]"),
    (dict(kernel_init=line_kernel(), kernel_strength=1.5), r"kernel_strength must be a number in \(0, 1\]"),
    (dict(kernel_init=line_kernel(), kernel_strength=True), r"kernel_strength must be a number in \(0, 1\]"),
    (dict(kernel_init=line_kernel(), kernel_strength="half"), r"kernel_strength must be a number in \(0, 1\]"),
    (dict(kernel_init=torch.ones(1, 1, 7, 7)), r"kernel_init is \(7, 7\) but kernel_size is 8"),
    (dict(kernel_init=-line_kernel()), "non-negative"),
    (dict(sigma="loud"), "sigma must be"),
    (dict(sigma=-1.0), "sigma is in 8-bit levels"),
])
def test_bad_start_settings_are_refused_before_any_step(kwargs, match):
    pipe = pipe_with()
    steps = []
    with pytest.raises(ValueError, match=match):
        pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8,
             callback_on_step_end=lambda p, i, t, d: steps.append(i) or {}, **kwargs)
    assert steps == []


def test_configured_strength_is_ignored_by_an_explicit_noise_start(tmp_path):
    pipe = pipe_with()
    pipe.register_to_config(kernel_init="sparse", kernel_strength=0.5)  # no estimator: "sparse" would fail
    out = pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8, kernel_init="noise", output_type="np")
    assert out.kernels.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="kernel_estimator component"):
        pipe(smooth_images(1, 3, 16, 16), num_inference_steps=2, kernel_size=8)


def test_save_load_round_trip_keeps_the_estimator_and_the_start_settings(tmp_path):
    estimator = KernelEstimator(kernel_size=9, num_iterations=2, regularization="pnp", denoiser_hidden_channels=4,
                                denoiser_num_layers=2)
    pipe = BlindDPSPipeline(**components(), kernel_estimator=estimator, kernel_init="sparse", kernel_strength=0.25)
    pipe.save_pretrained(tmp_path / "bdps")
    loaded = BlindDPSPipeline.from_pretrained(tmp_path / "bdps")
    assert loaded.config.kernel_init == "sparse" and loaded.config.kernel_strength == 0.25
    for a, b in zip(pipe.kernel_estimator.parameters(), loaded.kernel_estimator.parameters()):
        torch.testing.assert_close(a, b)
    # a folder without the estimator still loads (the paper's start needs none)
    BlindDPSPipeline(**components()).save_pretrained(tmp_path / "plain")
    plain = BlindDPSPipeline.from_pretrained(tmp_path / "plain")
    assert plain.kernel_estimator is None and plain.config.kernel_init == "noise"
    # the turbulence pipeline loads the BlindDPS folder's priors and ignores its start settings
    turbulence = BlindDPSTurbulencePipeline.from_pretrained(tmp_path / "bdps",
                                                            tilt_unet=tiny_unet(in_channels=2, out_channels=2, seed=5))
    assert "kernel_estimator" not in turbulence.components and "kernel_init" not in turbulence.config


def test_kernel_init_names_match_the_pipelines():
    from diffusers_blind.methods import BLIND_DPS_KERNEL_INITS, FASTEM_KERNEL_INITS
    from diffusers_blind.pipelines.fast_em.pipeline_fast_em_deblur import KERNEL_INITS as FASTEM

    assert set(BLIND_DPS_KERNEL_INITS) == set(KERNEL_INITS) and set(FASTEM_KERNEL_INITS) == set(FASTEM)
    assert np.isclose(float(line_kernel().sum()), 1.0)


def test_a_start_kernel_that_no_step_would_hold_is_refused():
    pipe = pipe_with()  # class default kernel_strength = 1: the kernel chain starts from noise at every step
    with pytest.raises(ValueError, match="kernel_init would be ignored"):
        pipe(smooth_images(1, 3, 16, 16), num_inference_steps=4, kernel_size=8, kernel_init=line_kernel())
    with pytest.raises(ValueError, match="kernel_init would be ignored"):  # (1 − 0.9)·4 rounds to no held step
        pipe(smooth_images(1, 3, 16, 16), num_inference_steps=4, kernel_size=8, kernel_init=line_kernel(),
             kernel_strength=0.9)
