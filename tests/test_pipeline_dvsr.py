"""diffusers-style fast tests of StochasticRefinementDeblurPipeline on tiny components (CPU, offline).

The generic pipeline contract comes from ``PipelineTesterMixin``; the rest is specific to DvSR.
"""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.callbacks import PipelineCallback

from diffusers_blind import (
    ContinuousNoiseLevelScheduler,
    DeblurPredictor,
    KernelEstimator,
    StochasticRefinementDeblurPipeline,
    StochasticRefinementDeblurPipelineOutput,
)
from diffusers_blind.models import build_dvsr_denoiser
from diffusers_blind.ops import MotionKernelGenerator, fft_blur, gaussian_kernel
from diffusers_blind.pipelines.dvsr import perception_distortion_setting
from pipeline_mixin import PipelineTesterMixin


def make_components(estimator=False):
    torch.manual_seed(0)
    predictor = DeblurPredictor(block_out_channels=(8, 16), layers_per_block=1)
    torch.nn.init.normal_(predictor.conv_out.weight, std=0.05)  # not the identity, so x_init is visible
    denoiser = build_dvsr_denoiser(block_out_channels=(8, 16), norm_num_groups=4)
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100)
    est = KernelEstimator(kernel_size=5, num_iterations=2) if estimator else None
    return {"predictor": predictor, "denoiser": denoiser, "scheduler": scheduler, "kernel_estimator": est}


def make_pipe(estimator=False):
    pipe = StochasticRefinementDeblurPipeline(**make_components(estimator))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(batch=2, channels=3, height=12, width=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, height // 4 + 1, width // 4 + 1, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 1)


def run(pipe, image, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "pt")
    return pipe(image, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


class TestStochasticRefinementDeblurPipeline(PipelineTesterMixin):
    pipeline_class = StochasticRefinementDeblurPipeline
    returns_kernel = False
    extra_bad_inputs = [
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(perception_distortion=2.0), ValueError, "not both"),
        (dict(eta=-1.0), ValueError, "eta"),
    ]

    def get_dummy_components(self):
        return make_components(estimator=False)

    def get_dummy_inputs(self, seed=0, batch=1):
        generator = [torch.Generator().manual_seed(seed + i) for i in range(batch)] if batch > 1 else torch.Generator().manual_seed(seed)
        return {"image": images(batch, height=16, width=16, seed=seed), "generator": generator,
                "num_inference_steps": 3, "num_samples": 2, "output_type": "np"}


class TestStochasticRefinementDeblurPipelineWithKernel(TestStochasticRefinementDeblurPipeline):
    returns_kernel = True

    def get_dummy_components(self):
        return make_components(estimator=True)


@pytest.mark.parametrize("residual_scale", [1.0, 0.1])
def test_output_is_x_init_plus_z0(residual_scale):
    """Alg. 1: the restored image is x_init + s·z_0 (the final latents; s = 1 in the paper), mapped to [0, 1]."""
    pipe = StochasticRefinementDeblurPipeline(**make_components(), residual_scale=residual_scale)
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def grab(p, i, t, tensors):
        seen.update(tensors)
        return {}

    out = run(pipe, images(1, height=16, width=16), num_samples=1, callback_on_step_end=grab,
              callback_on_step_end_tensor_inputs=["latents", "x_init"])
    expected = ((seen["x_init"] + residual_scale * seen["latents"] + 1) / 2).clamp(0, 1)
    assert torch.allclose(out.images, expected, atol=1e-6)
    assert torch.allclose(out.x_init, ((seen["x_init"] + 1) / 2).clamp(0, 1), atol=1e-6)
    assert not torch.allclose(out.images, out.x_init, atol=1e-3)


def test_sample_averaging_equals_separate_single_runs(pipe):
    """SA over n samples seeded g_1…g_n equals the mean of n single runs with the same seeds; one sample has no std."""
    x = images(1)
    seeds = [3, 4, 5]
    single = [pipe(x, num_inference_steps=3, num_samples=1, generator=torch.Generator().manual_seed(s), output_type="pt")
              for s in seeds]
    averaged = pipe(x, num_inference_steps=3, num_samples=3, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in seeds])
    stacked = torch.stack([o.images[0] for o in single])
    assert torch.allclose(averaged.samples[0], stacked, atol=1e-5)
    assert torch.allclose(averaged.images[0], stacked.mean(0), atol=1e-5)
    assert torch.allclose(averaged.uncertainty[0], stacked.std(0, unbiased=False).mean(0, keepdim=True), atol=1e-5)
    assert single[0].uncertainty is None and torch.equal(single[0].images, single[0].samples[:, 0])


def test_perception_distortion_knob(pipe):
    assert perception_distortion_setting(0.0) == (100, 1)
    assert perception_distortion_setting(1.0) == (1, 16)
    assert perception_distortion_setting(0.5) == (10, 4)  # the paper's "Ours-SA"
    settings = [perception_distortion_setting(p) for p in np.linspace(0, 1, 6)]
    assert all(a[0] >= b[0] and a[1] <= b[1] for a, b in zip(settings, settings[1:]))
    x = images(1)
    sharp_end = pipe(x, perception_distortion=0.0, output_type="pt", generator=torch.manual_seed(0))
    assert pipe.num_timesteps == 100 and sharp_end.samples.shape[1] == 1 and sharp_end.uncertainty is None
    smooth_end = pipe(x, perception_distortion=1.0, output_type="pt", generator=torch.manual_seed(0))
    assert pipe.num_timesteps == 1 and smooth_end.samples.shape[1] == 16 and smooth_end.uncertainty is not None
    default = pipe(x, output_type="pt", generator=torch.manual_seed(0))
    assert torch.equal(default.images, smooth_end.images)  # the knob's default is the distortion end
    explicit = pipe(x, num_inference_steps=7, output_type="pt", generator=torch.manual_seed(0))
    assert pipe.num_timesteps == 7 and explicit.samples.shape[1] == 1
    # averaging shrinks the spread around x_init
    spread = lambda o: float((o.images - o.x_init).abs().mean())  # noqa: E731
    assert spread(smooth_end) < spread(sharp_end)
    with pytest.raises(ValueError, match="not both"):
        pipe(x, perception_distortion=0.5, num_samples=2)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        pipe(x, perception_distortion=1.5)


@pytest.mark.parametrize("size", [(13, 19), (7, 5), (33, 17)])
def test_any_size_fully_convolutional(pipe, size):
    out = run(pipe, images(1, height=size[0], width=size[1]))
    assert out.images.shape == (1, 3, *size) and out.x_init.shape == (1, 3, *size)


def test_output_types_and_tuple(pipe):
    x = images(2)
    pt = run(pipe, x, num_samples=2)
    np_out = run(pipe, x, num_samples=2, output_type="np")
    pil = run(pipe, x, num_samples=2, output_type="pil")
    assert isinstance(pt, StochasticRefinementDeblurPipelineOutput) and pt.kernels is None
    assert pt.images.shape == (2, 3, 12, 20) and pt.samples.shape == (2, 2, 3, 12, 20) and pt.uncertainty.shape == (2, 1, 12, 20)
    assert np_out.images.shape == (2, 12, 20, 3) and np_out.samples.shape == (2, 2, 12, 20, 3) and np_out.uncertainty.shape == (2, 12, 20)
    assert np.allclose(np_out.images, pt.images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert len(pil.images) == 2 and isinstance(pil.images[0], PIL.Image.Image) and pil.images[0].size == (20, 12)
    latent = run(pipe, images(2, height=13, width=19), output_type="latent")
    assert latent.images.shape == (2, 3, 14, 20)  # padded to the multiple of 2 of both tiny networks
    images_, kernels, uncertainty = run(pipe, x, num_samples=2, return_dict=False)
    assert torch.equal(images_, pt.images) and kernels is None and uncertainty.shape == (2, 1, 12, 20)


def test_batch_matches_single_images(pipe):
    x = images(2)
    batch = pipe(x, num_inference_steps=3, output_type="pt", generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    for i, s in enumerate((0, 1)):
        one = pipe(x[i : i + 1], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(s))
        assert torch.allclose(batch.images[i], one.images[0], atol=1e-5)


def test_reproducible_under_a_seed(pipe):
    x = images(1)
    a, b, c = run(pipe, x, seed=1), run(pipe, x, seed=1), run(pipe, x, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert torch.equal(a.x_init, c.x_init)  # the predictor is deterministic


def test_grayscale_inputs(pipe):
    gray = images(1, channels=1)[0, 0].numpy()  # (H, W) float array
    out = pipe(gray, num_inference_steps=2, output_type="np", generator=torch.manual_seed(0))
    assert out.images.shape == (1, 12, 20, 1)
    pil = pipe(PIL.Image.fromarray((gray * 255).astype(np.uint8), mode="L"), num_inference_steps=2, generator=torch.manual_seed(0))
    assert pil.images[0].mode == "L"


def test_callback_can_change_latents_and_interrupt(pipe):
    calls = []

    def zero_latents(p, i, t, tensors):
        calls.append(i)
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = run(pipe, images(1), num_inference_steps=4, callback_on_step_end=zero_latents)
    assert calls == [0, 1, 2, 3]
    assert torch.allclose(out.images, out.x_init, atol=1e-6)  # z_0 = 0 ⇒ output = x_init

    class Stop(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, p, i, t, tensors):
            calls.append(("stop", i))
            p._interrupt = True
            return tensors

    calls.clear()
    run(pipe, images(1), num_inference_steps=5, callback_on_step_end=Stop())
    assert calls == [("stop", 0)]  # interrupted after the first step


def test_custom_noise_levels_and_eta(pipe):
    x = images(1)
    out = pipe(x, noise_levels=[0.1, 0.5, 0.9], output_type="pt", generator=torch.manual_seed(0))
    assert pipe.num_timesteps == 3 and out.images.shape == (1, 3, 12, 20)
    a = run(pipe, x, eta=0.0, seed=0, latents=torch.zeros(1, 3, 12, 20))
    b = run(pipe, x, eta=0.0, seed=1, latents=torch.zeros(1, 3, 12, 20))
    assert torch.equal(a.images, b.images)  # deterministic chain from a fixed z_T


def test_mixed_precision_runs_the_networks_in_bf16_and_keeps_the_chain(pipe):
    x = images(1)
    seen = {}

    def hook(module, args, output):
        seen[type(module).__name__] = output.sample.dtype if hasattr(output, "sample") else output.dtype

    handles = [pipe.denoiser.register_forward_hook(hook), pipe.predictor.conv_out.register_forward_hook(hook)]
    try:
        a = run(pipe, x, num_samples=2)
        assert seen == {"UNet2DModel": torch.float32, "Conv2d": torch.float32}
        b = run(pipe, x, num_samples=2, mixed_precision="bf16")
        assert seen == {"UNet2DModel": torch.bfloat16, "Conv2d": torch.bfloat16}
    finally:
        for handle in handles:
            handle.remove()
    assert b.images.dtype == torch.float32
    difference = (a.images - b.images).abs()
    assert 0 < float(difference.max()) < 0.05  # bf16 rounding, not another result


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image": torch.rand(1, 2, 8, 8)}, "channels"),
        ({"image": torch.rand(1, 3, 8, 8) * 255}, "\\[0, 1\\]"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_samples": 0}, "num_samples"),
        ({"output_type": "jpg"}, "output_type"),
        ({"eta": -1.0}, "eta"),
        ({"boundary_margin": -2}, "boundary_margin"),
        ({"callback_on_step_end_tensor_inputs": ["kernel"]}, "callback_on_step_end_tensor_inputs"),
        ({"latents": torch.zeros(1, 3, 4, 4)}, "latents"),
        ({"generator": [torch.manual_seed(0)] * 3}, "generator list"),
        ({"noise_levels": [0.9, 0.1]}, "increasing"),
        ({"noise_levels": []}, "noise_levels must be a non-empty"),
        ({"num_inference_steps": "3"}, "got '3'"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"eta": "x"}, "eta must be None or a finite number"),
        ({"perception_distortion": "a", "num_inference_steps": None}, "perception_distortion must be a number"),
        ({"perception_distortion": True, "num_inference_steps": None}, "perception_distortion must be a number"),
        ({"num_samples": True}, "num_samples"),
        ({"sigma": -1}, "sigma"),
        ({"sigma": "high"}, "sigma"),
        ({"sigma": True}, "sigma"),
        ({"sigma": None}, "sigma"),
        ({"sigma": [1.0, 2.0]}, "one value per image"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, match):
    kwargs = {"image": torch.rand(1, 3, 8, 8), "num_inference_steps": 2, **kwargs}
    if "noise_levels" in kwargs or kwargs["num_inference_steps"] is None:
        kwargs.pop("num_inference_steps")
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(**kwargs)


def test_save_load_round_trip(tmp_path):
    for estimator in (False, True):
        pipe = StochasticRefinementDeblurPipeline(**make_components(estimator), residual_scale=0.25)
        pipe.set_progress_bar_config(disable=True)
        folder = tmp_path / f"pipe_{estimator}"
        pipe.save_pretrained(folder)
        assert (folder / "predictor" / "diffusion_pytorch_model.safetensors").is_file()
        loaded = StochasticRefinementDeblurPipeline.from_pretrained(folder)
        loaded.set_progress_bar_config(disable=True)
        assert (loaded.kernel_estimator is None) == (not estimator) and loaded.config.residual_scale == 0.25
        a, b = run(pipe, images(1), num_samples=2), run(loaded, images(1), num_samples=2)
        # equal up to float rounding: channels-last convolutions may pick another kernel for the loaded weights' buffers
        assert torch.allclose(a.images, b.images, atol=1e-6, rtol=0)
        if estimator:
            assert torch.equal(a.kernels, b.kernels)


def test_residual_scale_must_be_positive():
    with pytest.raises(ValueError, match="residual_scale"):
        StochasticRefinementDeblurPipeline(**make_components(), residual_scale=0.0)


def test_kernel_from_the_m_step():
    """With a kernel estimator the pipeline returns a sum-1 kernel; the M-step recovers a known blur from a true pair."""
    pipe = make_pipe(estimator=True)
    out = run(pipe, images(2, height=16, width=16), sigma=5)
    assert out.kernels.shape == (2, 1, 5, 5) and out.sigma == pytest.approx([5.0, 5.0])
    assert torch.allclose(out.kernels.sum((-2, -1)), torch.ones(2, 1), atol=1e-5) and (out.kernels >= 0).all()
    # on an exact (sharp, blurry) pair the estimate is close to the true kernel, and far closer than a Dirac
    pipe.kernel_estimator = KernelEstimator(kernel_size=5, num_iterations=20, regularization="l1", lambda_=0.0)
    g = torch.Generator().manual_seed(0)
    sharp = torch.rand(1, 1, 48, 48, generator=g)
    true = gaussian_kernel(5, (1.0, 0.6), angle=0.5)
    blurry = fft_blur(sharp, true)
    estimate = pipe.estimate_kernel(blurry, sharp, torch.tensor([1e-3]), iterations=2)
    dirac = torch.zeros_like(true)
    dirac[..., 2, 2] = 1
    error, dirac_error = float(((estimate - true) ** 2).sum()), float(((dirac - true) ** 2).sum())
    assert error < 0.1 * dirac_error


def test_kernel_from_a_photograph_with_linear_borders():
    """A crop of a linearly blurred larger image: the M-step under the valid mask recovers the kernel exactly.

    Its border pixels depend on scene outside the crop; an edge taper with the circular solve leaves
    a relative error near 0.09 here, the valid-pixel least squares below 1e-3.
    """
    pipe = make_pipe(estimator=True)
    pipe.kernel_estimator = KernelEstimator(kernel_size=9, num_iterations=20, regularization="l1", lambda_=0.0)
    scene = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(0)), 2)
    true = MotionKernelGenerator(9, 0.5)(1, generator=torch.Generator().manual_seed(3))
    blurry, sharp = fft_blur(scene, true)[..., 8:-8, 8:-8], scene[..., 8:-8, 8:-8]
    estimate = pipe.estimate_kernel(blurry, sharp, torch.tensor([1e-3]), iterations=2)
    assert float(((estimate - true) ** 2).sum() / (true**2).sum()) < 1e-3


def test_sigma_is_checked_before_the_diffusion_with_a_kernel_estimator():
    pipe = make_pipe(estimator=True)
    calls = []
    handle = pipe.denoiser.register_forward_hook(lambda *args: calls.append(1))
    try:
        for bad in ("high", -3, True):
            with pytest.raises(ValueError, match="sigma"):
                run(pipe, images(1), sigma=bad)
        assert calls == []  # refused up front, not after the whole chain
        for good in ("auto", 3, [3, 20], torch.tensor([3.0, 20.0]), np.array(7.0)):
            out = run(pipe, images(2), sigma=good, num_inference_steps=1)
            assert out.kernels.shape == (2, 1, 5, 5) and len(out.sigma) == 2
    finally:
        handle.remove()


@pytest.mark.parametrize("size", [(2, 2), (4, 7), (8, 8)])
def test_kernel_of_an_image_smaller_than_the_kernel_uses_the_tapered_fourier_fallback(size):
    pipe = make_pipe(estimator=True)
    pipe.kernel_estimator = KernelEstimator(kernel_size=9, num_iterations=2)  # (8, 8) pads to 22 < 33 likewise
    out = run(pipe, images(1, height=size[0], width=size[1]), sigma=5)
    assert out.images.shape == (1, 3, *size) and out.kernels.shape == (1, 1, 9, 9)
    assert torch.isfinite(out.kernels).all() and (out.kernels >= 0).all()
    assert float(out.kernels.sum()) == pytest.approx(1.0, abs=1e-5)


def test_latent_output_keeps_the_kernel_and_sigma():
    pipe = make_pipe(estimator=True)
    pt = run(pipe, images(2), sigma=[4, 6])
    latent = run(pipe, images(2), sigma=[4, 6], output_type="latent")
    assert latent.images.shape == (2, 3, 12, 20)
    assert torch.is_tensor(latent.kernels) and latent.kernels.shape == (2, 1, 5, 5)
    torch.testing.assert_close(latent.kernels, pt.kernels)
    assert latent.sigma == pytest.approx([4.0, 6.0])
    images_, kernels, uncertainty = run(pipe, images(2), sigma=[4, 6], output_type="latent", return_dict=False)
    torch.testing.assert_close(kernels, pt.kernels)
    assert uncertainty is None
    assert run(make_pipe(), images(1), output_type="latent").kernels is None  # no estimator: no kernel


def test_a_scheduler_with_integer_timesteps_is_refused(pipe):
    """The denoiser is conditioned on the continuous noise level: a DDPM/DDIM scheduler would feed it timesteps."""
    from diffusers import DDIMScheduler

    swapped = StochasticRefinementDeblurPipeline(**{**pipe.components, "scheduler": DDIMScheduler()})
    with pytest.raises(TypeError, match="ContinuousNoiseLevelScheduler"):
        swapped(torch.rand(1, 3, 8, 8), num_inference_steps=2)


def test_mixed_precision_takes_the_shared_names(pipe, monkeypatch):
    """``"auto"`` and accelerate's names mean what Fast EM's ``precision`` means."""
    import diffusers_blind.pipelines.tiling as tiling

    monkeypatch.setattr(tiling, "cpu_has_fast_bfloat16", lambda: True)
    image = torch.rand(1, 3, 8, 8)
    auto = run(pipe, image, mixed_precision="auto")
    bf16 = run(pipe, image, mixed_precision="bf16")
    np.testing.assert_array_equal(np.asarray(run(pipe, image, precision="bfloat16").images), np.asarray(bf16.images))
    with pytest.raises(ValueError, match="either precision or mixed_precision"):
        run(pipe, image, precision="bf16", mixed_precision="bf16")
    full = run(pipe, image, mixed_precision="no")
    np.testing.assert_array_equal(np.asarray(auto.images), np.asarray(bf16.images))
    assert not np.array_equal(np.asarray(auto.images), np.asarray(full.images))
