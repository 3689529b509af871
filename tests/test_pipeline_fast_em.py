"""diffusers-style fast tests of FastEMDeblurPipeline on tiny components (CPU, offline).

The generic pipeline contract comes from ``PipelineTesterMixin``; this file adds what is specific to Fast EM.
"""

import json
import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import smooth_images, tiny_ddpm, tiny_unet
from diffusers import DDIMScheduler
from pipeline_mixin import PipelineTesterMixin

import diffusers_blind
from diffusers_blind import FastEMDeblurPipeline, FastEMDeblurPipelineOutput, KernelEstimator
from diffusers_blind.ops import dirac_kernel, fft_blur, gaussian_kernel


ddpm = tiny_ddpm

# save -> load restores bit-identical weights, but the loaded tensors sit at other addresses, so the CPU
# kernels may take other vector paths; a blind run amplifies those last-bit differences (1.7e-5 seen)
ROUND_TRIP_ATOL = 1e-4


def make_pipe(estimator=True, unet=None, scheduler=None):
    torch.manual_seed(0)
    est = KernelEstimator(kernel_size=5, num_iterations=2) if estimator else None
    pipe = FastEMDeblurPipeline(unet or tiny_unet(), scheduler or ddpm(), est)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, image, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("guard", False)  # tiny random UNets do not explain anything; the guard has its own tests
    return pipe(image, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


class TestFastEMDeblurPipeline(PipelineTesterMixin):
    pipeline_class = FastEMDeblurPipeline
    # The reloaded weights are bit-identical, but the time embedding's matrix product already differs in the last
    # bit (9e-7 on one UNet call: other buffers, another code path of the BLAS); three blind steps with M-steps
    # amplify that to 5e-6 with global attention and 1.5e-5 with windowed attention.
    round_trip_tolerance = 5e-5
    extra_bad_inputs = [
        (dict(image=torch.randint(0, 3, (1, 3, 16, 16), dtype=torch.int64)), TypeError, "dtype"),
        (dict(image=np.zeros((16, 16, 3), dtype=np.int32)), TypeError, "dtype"),
        (dict(image=torch.rand(1, 3, 16, 16) * 2 - 1), ValueError, r"\[0, 1\]"),
        (dict(guidance="magic"), ValueError, "guidance"),
        (dict(sigma=None), ValueError, "sigma"),
        (dict(sigma=True), ValueError, "sigma"),  # bools are not noise levels
        (dict(sigma=[True]), ValueError, "sigma"),
        (dict(num_particles=True), ValueError, "num_particles"),
        (dict(kernel_size=True), ValueError, "kernel_size"),
        (dict(boundary_margin=True), ValueError, "boundary_margin"),
        (dict(boundary_margin=2.5), ValueError, "boundary_margin"),
    ]

    def get_dummy_components(self):
        torch.manual_seed(0)
        return dict(
            unet=tiny_unet(), scheduler=tiny_ddpm(), kernel_estimator=KernelEstimator(kernel_size=5, num_iterations=2)
        )

    def get_dummy_inputs(self, seed=0, batch=1):
        generator = (
            torch.Generator().manual_seed(seed) if batch == 1
            else [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        )
        return dict(image=smooth_images(batch), sigma=10, num_inference_steps=3, output_type="np", generator=generator,
                    guard=False)


def test_particles_uncertainty_and_latent_outputs(pipe):
    image = smooth_images()
    out_np = run(pipe, image, num_particles=2)
    assert isinstance(out_np, FastEMDeblurPipelineOutput)
    assert out_np.images.shape == (2, 20, 24, 3)
    assert out_np.kernels.shape == (2, 5, 5)
    assert out_np.uncertainty.shape == (2, 20, 24)
    assert out_np.particles.shape == (2, 2, 20, 24, 3)
    np.testing.assert_allclose(out_np.particles.mean(1), out_np.images, atol=1e-6)
    np.testing.assert_allclose(out_np.kernels.sum((-2, -1)), 1.0, atol=1e-5)
    assert (out_np.kernels >= 0).all()

    out_pt = run(pipe, image, output_type="pt")
    assert out_pt.images.shape == (2, 3, 20, 24) and out_pt.kernels.shape == (2, 1, 5, 5)
    assert out_pt.uncertainty is None
    np.testing.assert_allclose(out_pt.images.permute(0, 2, 3, 1).numpy(), run(pipe, image).images, atol=1e-6)

    out_pil = run(pipe, image, output_type="pil")
    assert len(out_pil.images) == 2 and out_pil.images[0].size == (24, 20)

    latent = run(pipe, image, output_type="latent").images
    assert latent.shape[0] == 2 and latent.shape[-2] % 2 == 0 and latent.shape[-2] >= 20 + 2 * 2


def test_accepts_pil_numpy_and_grayscale(pipe):
    array = (smooth_images(1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    out = run(pipe, PIL.Image.fromarray(array))
    assert out.images.shape == (1, 20, 24, 3)
    gray = run(pipe, array[..., 0])
    assert gray.images.shape == (1, 20, 24, 1)
    odd = run(pipe, torch.rand(1, 3, 17, 23))
    assert odd.images.shape == (1, 17, 23, 3)


def test_batch_equals_single_with_particles(pipe):
    image = smooth_images(2)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    batch = pipe(image, num_inference_steps=3, output_type="np", num_particles=2, generator=gens)
    for i, s in enumerate((11, 12)):
        single = pipe(image[i : i + 1], num_inference_steps=3, output_type="np", num_particles=2,
                      generator=[torch.Generator().manual_seed(s)])
        np.testing.assert_allclose(batch.images[i], single.images[0], atol=1e-5)
        np.testing.assert_allclose(batch.kernels[i], single.kernels[0], atol=1e-6)


def test_saved_folder_layout_and_estimator_weights(tmp_path, pipe):
    image = smooth_images(1)
    expected = run(pipe, image)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["kernel_estimator"] == ["diffusers_blind.models.kernel_estimator", "KernelEstimator"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert (tmp_path / "kernel_estimator" / "diffusion_pytorch_model.safetensors").exists()
    loaded = FastEMDeblurPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.kernel_estimator, KernelEstimator)
    assert loaded.kernel_estimator.config.num_iterations == 2
    for name, param in pipe.kernel_estimator.state_dict().items():
        torch.testing.assert_close(loaded.kernel_estimator.state_dict()[name], param)
    np.testing.assert_allclose(run(loaded, image).images, expected.images, atol=ROUND_TRIP_ATOL)


def test_optional_estimator_none(tmp_path):
    pipe = make_pipe(estimator=False)
    image = smooth_images(1)
    kernel = gaussian_kernel(5, 1.0)
    out = run(pipe, image, kernel=kernel, output_type="pt")
    torch.testing.assert_close(out.kernels, kernel)
    with pytest.raises(ValueError, match="kernel_estimator"):
        run(pipe, image)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["kernel_estimator"] == [None, None]
    assert FastEMDeblurPipeline.from_pretrained(tmp_path).kernel_estimator is None


def test_push_to_hub_uploads_the_pipeline_folder(monkeypatch, pipe):
    import diffusers.utils.hub_utils as hub_utils
    from huggingface_hub import ModelCard

    uploaded = {}

    class Repo:
        repo_id = "user/fast-em-test"

    def fake_upload(self, working_dir, repo_id, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(
            os.path.relpath(os.path.join(root, f), working_dir) for root, _, files in os.walk(working_dir) for f in files
        )
        uploaded["index"] = json.loads(open(os.path.join(working_dir, "model_index.json")).read())

    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kw: Repo())
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **k: ModelCard("---\nlicense: apache-2.0\n---\n"))
    monkeypatch.setattr(hub_utils.PushToHubMixin, "_upload_folder", fake_upload)
    pipe.push_to_hub("user/fast-em-test")
    assert uploaded["repo_id"] == "user/fast-em-test"
    assert "kernel_estimator/diffusion_pytorch_model.safetensors" in uploaded["files"]
    assert "unet/diffusion_pytorch_model.safetensors" in uploaded["files"]
    assert uploaded["index"]["_class_name"] == "FastEMDeblurPipeline"


def test_callback_on_step_end_sees_and_replaces_tensors(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, int(timestep), tuple(tensors)))
        assert tensors["kernel"].shape == (1, 1, 5, 5)
        if step == p.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    out = run(pipe, smooth_images(1), output_type="latent", callback_on_step_end=callback,
              callback_on_step_end_tensor_inputs=["latents", "kernel", "x0"])
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert seen[0][1] == 999 and seen[-1][1] == 0
    assert seen[0][2] == ("latents", "kernel", "x0")
    assert out.images.abs().max() == 0


def test_callback_replacing_kernel_drives_guidance():
    pipe = make_pipe(estimator=False)
    image = smooth_images(1)
    wide = gaussian_kernel(5, 2.0)

    def swap(p, step, timestep, tensors):
        return {"kernel": wide}

    a = run(pipe, image, kernel=gaussian_kernel(5, 0.5), callback_on_step_end=swap,
            callback_on_step_end_tensor_inputs=["kernel"], num_inference_steps=4)
    b = run(pipe, image, kernel=gaussian_kernel(5, 0.5), num_inference_steps=4)
    assert np.abs(a.images - b.images).max() > 1e-6
    np.testing.assert_allclose(a.kernels[0], wide[0, 0].numpy(), atol=1e-7)


def test_linspace_spacing_matches_reference_respacing(pipe):
    pipe.scheduler.set_timesteps(100)
    expected = np.round(np.linspace(0, 999, 100)).astype(int)[::-1]
    np.testing.assert_array_equal(pipe.scheduler.timesteps.numpy(), expected)
    sqrt_ab, r2, v = pipe.guidance_coefficients(0, pipe.scheduler.timesteps, "fastem")
    # docs/conventions.md, "Guidance": t = 999 → v ≈ 0.182, r² ≈ 0.154
    assert abs(v - 0.182) < 2e-3 and abs(r2 - 0.154) < 2e-3 and abs(sqrt_ab**2 - 4.0e-5) < 1e-6
    assert pipe.guidance_coefficients(99, pipe.scheduler.timesteps, "fastem")[1] == 0.0
    _, r2_pigdm, _ = pipe.guidance_coefficients(0, pipe.scheduler.timesteps, "pigdm")
    assert abs(r2_pigdm - (1 - 4.0e-5)) < 1e-5


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_learned_variance_unet(variance_type):
    pipe = make_pipe(unet=tiny_unet(out_channels=6), scheduler=ddpm(variance_type=variance_type))
    out = run(pipe, smooth_images(1))
    assert out.images.shape == (1, 20, 24, 3) and np.isfinite(out.images).all()


def test_ddim_scheduler_and_guidances():
    pipe = make_pipe(scheduler=DDIMScheduler.from_config(ddpm().config))
    image = smooth_images(1)
    for guidance in ("pigdm", "dps"):
        out = run(pipe, image, guidance=guidance)
        assert np.isfinite(out.images).all()
    a, b = run(pipe, image, seed=1), run(pipe, image, seed=1)
    np.testing.assert_array_equal(a.images, b.images)


def test_diffusion_em_runs_several_passes(pipe):
    steps = []
    out = run(pipe, smooth_images(1), em_iterations=2,
              callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == list(range(6)) and pipe.num_timesteps == 6
    assert out.kernels.shape == (1, 5, 5)
    np.testing.assert_allclose(out.kernels.sum(), 1.0, atol=1e-5)


def test_sigma_auto_and_units(pipe):
    g = torch.Generator().manual_seed(0)
    image = (smooth_images(1, height=32, width=32) + torch.randn(1, 3, 32, 32, generator=g) * 20 / 255)
    out = run(pipe, image.clamp(-0.4, 1.4), sigma="auto")
    assert 14 < out.sigma[0] < 26
    assert run(pipe, smooth_images(2), sigma=[5, 10]).sigma == pytest.approx([5.0, 10.0])


def test_sigma_auto_warns_when_the_photo_is_almost_noise_free(pipe):
    ramp = torch.linspace(0.2, 0.8, 32)
    clean = (ramp[:, None] * 0.5 + ramp[None, :] * 0.5).expand(1, 3, 32, 32).contiguous()
    with pytest.warns(UserWarning, match="sigma=2 or more"):
        out = run(pipe, clean, sigma="auto", blind_sigma_floor=0)
    assert out.sigma[0] < 1.0
    with pytest.warns(UserWarning, match="sigma=2 or more"):  # a known kernel keeps the estimate
        out = run(pipe, clean, sigma="auto", kernel=gaussian_kernel(5, 1.0))
    assert out.sigma[0] < 1.0
    with warnings.catch_warnings():  # blind: the floor replaces the warning, and the output says so
        warnings.simplefilter("error", UserWarning)
        assert run(pipe, clean, sigma="auto").sigma[0] == pytest.approx(5.0)
        assert run(pipe, clean, sigma=1, blind_sigma_floor=3).sigma[0] == pytest.approx(3.0)
    assert run(pipe, clean, sigma=1, kernel=gaussian_kernel(5, 1.0)).sigma[0] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    noisy = (clean + torch.randn(1, 3, 32, 32, generator=g) * 10 / 255).clamp(0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run(pipe, noisy, sigma="auto")


def test_guidance_pulls_towards_the_measurement():
    """With a strong step, Pi-GDM's output re-blurred fits y better than the unguided sample."""
    pipe = make_pipe(estimator=False)
    kernel = gaussian_kernel(5, 1.0)
    sharp = smooth_images(1, height=16, width=16)
    y = fft_blur(sharp, kernel)

    def residual(out):
        return (fft_blur(out.images, kernel) - y).norm().item()

    kwargs = dict(kernel=kernel, num_inference_steps=20, output_type="pt", boundary_margin=0, sigma=2)
    unguided = residual(run(pipe, y, guidance_scale=0.0, **kwargs))
    guided = residual(run(pipe, y, guidance_scale=20.0, **kwargs))
    assert guided < 0.7 * unguided


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma=-1), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(sigma="loud"), "sigma"),
        (dict(sigma=[1, 2, 3]), "sigma"),
        (dict(guidance="magic"), "guidance"),
        (dict(num_particles=0), "num_particles"),
        (dict(kernel_size=64), "larger than the image"),
        (dict(kernel=-gaussian_kernel(5, 1.0)), "non-negative"),
        (dict(kernel=torch.ones(2, 2, 5, 5)), "kernel must be"),
        (dict(kernel=gaussian_kernel(5, 1.0), em_iterations=2), "em_iterations"),
        (dict(latents=torch.zeros(1, 3, 8, 8)), "latents must have shape"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(num_scales=0), "num_scales"),
        (dict(num_scales=2.0), "num_scales"),
        (dict(refine_strength=0), "refine_strength"),
        (dict(refine_strength=1.5), "refine_strength"),
        (dict(strength=0), "strength"),
        (dict(strength=1.2), "strength"),
        (dict(strength="half"), "strength"),
        (dict(strength=0.5, em_iterations=2), "em_iterations"),
        (dict(guidance_iterations=-1), "guidance_iterations"),
        (dict(guidance_iterations=2.5), "guidance_iterations"),
        (dict(blind_sigma_floor=-1), "blind_sigma_floor"),
        (dict(blind_sigma_floor=float("nan")), "blind_sigma_floor"),
        (dict(kernel=gaussian_kernel(5, 1.0), kernel_size=9), "leave kernel_size out"),
        (dict(eta=-1.0), "eta must be"),
        (dict(eta=float("nan")), "eta must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, smooth_images(1), **kwargs)


def test_default_model_path_is_inside_the_package():
    assert diffusers_blind.DEFAULT_MODEL.endswith("default_model")
    assert os.path.dirname(diffusers_blind.DEFAULT_MODEL) == os.path.dirname(diffusers_blind.__file__)


def test_guidance_scale_property_is_the_call_value_and_callback_can_change_it(recwarn):
    pipe = make_pipe()
    pipe.register_to_config(guidance_scale=2.5)
    assert pipe.guidance_scale == 2.5  # the saved default before any call
    assert not [w for w in recwarn.list if issubclass(w.category, FutureWarning)]
    seen = []

    def record(p, step, timestep, tensors):
        seen.append(p.guidance_scale)
        return tensors

    run(pipe, smooth_images(1), guidance_scale=4.0, callback_on_step_end=record)
    assert seen == [4.0, 4.0, 4.0] and pipe.guidance_scale == 4.0
    seen.clear()
    run(pipe, smooth_images(1), callback_on_step_end=record)
    assert seen == [2.5, 2.5, 2.5]

    def switch_off(p, step, timestep, tensors):
        p._guidance_scale = 0.0
        return tensors

    image = smooth_images(1)
    kwargs = dict(kernel=gaussian_kernel(5, 1.0), num_inference_steps=4, guidance_scale=20.0)
    changed = run(pipe, image, callback_on_step_end=switch_off, **kwargs)
    unchanged = run(pipe, image, **kwargs)
    assert np.abs(changed.images - unchanged.images).max() > 1e-4
    with pytest.raises(AttributeError):
        pipe.guidance_scale = 1.0


def test_guidance_iterations_solve_the_valid_model_and_leave_circular_runs_alone(monkeypatch):
    """With a margin, Pi-GDM's masked solve runs ``guidance_iterations`` CG steps; without one there is no mask."""
    from diffusers_blind.pipelines.fast_em import pipeline_fast_em_deblur as module

    seen = []
    real = module.pigdm_guidance

    def spy(*args, **kwargs):
        seen.append((kwargs.get("residual_weight") is not None, kwargs.get("cg_iterations")))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "pigdm_guidance", spy)
    pipe = make_pipe(estimator=False)
    image, kernel = smooth_images(1), gaussian_kernel(5, 1.0)
    exact = run(pipe, image, kernel=kernel, sigma=1, output_type="pt").images
    assert seen and all(masked and iterations == module.MASKED_GUIDANCE_ITERATIONS for masked, iterations in seen)
    approximate = run(pipe, image, kernel=kernel, sigma=1, output_type="pt", guidance_iterations=0).images
    assert (exact - approximate).abs().max() > 1e-4
    seen.clear()
    circular = [run(pipe, image, kernel=kernel, sigma=1, output_type="pt", boundary_margin=0, guidance_iterations=n).images
                for n in (0, 10)]
    assert all(not masked for masked, _ in seen)
    torch.testing.assert_close(circular[0], circular[1])


def test_dps_reads_its_own_default_scale_and_falls_back_to_the_shared_one():
    pipe = make_pipe()
    pipe.register_to_config(guidance_scale=2.5, dps_guidance_scale=None)
    seen = []

    def record(p, step, timestep, tensors):
        seen.append(p.guidance_scale)
        return tensors

    run(pipe, smooth_images(1), guidance="dps", callback_on_step_end=record)
    assert seen == [2.5] * 3  # no DPS value: the shared default
    pipe.register_to_config(dps_guidance_scale=0.75)
    seen.clear()
    run(pipe, smooth_images(1), guidance="dps", callback_on_step_end=record)
    assert seen == [0.75] * 3
    seen.clear()
    run(pipe, smooth_images(1), callback_on_step_end=record)
    assert seen == [2.5] * 3  # Pi-GDM keeps guidance_scale
    assert pipe.default_guidance_scale("dps") == 0.75 and pipe.default_guidance_scale("pigdm") == 2.5


def test_dps_step_grows_with_the_respacing():
    """DPS's update is ``−guidance_scale·√ᾱ_t·(T/N)·∇‖y − k ⊛ x̂0‖``; the call sets ``T/N`` from its step count."""
    from diffusers_blind.pipelines.fast_em.pipeline_fast_em_deblur import FastEMProblem

    pipe = make_pipe(estimator=False)
    pipe.scheduler.set_timesteps(4)
    y = smooth_images(1, height=16, width=16)
    kernel = gaussian_kernel(5, 1.0)
    kernel = kernel.reshape(1, 1, *kernel.shape[-2:])

    def update(factor):
        problem = FastEMProblem(measurement=y, sigma=torch.tensor([0.02]), taper_window=torch.ones(1, 1, 16, 16),
                                num_particles=1, guidance="dps", r_schedule="fastem", estimate_kernel=False,
                                dps_step_factor=factor)
        x_t = torch.zeros(1, 3, 16, 16, requires_grad=True)
        with torch.enable_grad():
            x0 = (x_t + 0.3 * torch.sin(torch.arange(16.0))).sigmoid()
        pipe._guidance_scale = 2.0
        return pipe.guided_latents(problem, x_t, x0, torch.zeros(1, 3, 16, 16), kernel, step_index=1)

    one, three = update(1.0), update(3.0)
    assert one.abs().max() > 0
    torch.testing.assert_close(three, 3 * one)

    factors = []
    original = FastEMDeblurPipeline.guided_latents

    def spy(self, problem, *args, **kwargs):
        factors.append(problem.dps_step_factor)
        return original(self, problem, *args, **kwargs)

    FastEMDeblurPipeline.guided_latents = spy
    try:
        for steps in (4, 8):
            run(pipe, smooth_images(1), kernel=gaussian_kernel(5, 1.0), guidance="dps", num_inference_steps=steps)
    finally:
        FastEMDeblurPipeline.guided_latents = original
    train_steps = pipe.scheduler.config.num_train_timesteps
    assert factors == [train_steps / 4] * 4 + [train_steps / 8] * 8


@pytest.mark.parametrize("regularization", ["pnp", "l1", "l2", "none"])
def test_every_regularization_runs_and_round_trips(tmp_path, regularization):
    torch.manual_seed(0)
    estimator = KernelEstimator(kernel_size=5, num_iterations=2, regularization=regularization, lambda_=1e-3)
    pipe = FastEMDeblurPipeline(tiny_unet(), ddpm(), estimator)
    pipe.set_progress_bar_config(disable=True)
    image = smooth_images(1)
    expected = run(pipe, image)
    assert np.isfinite(expected.images).all()
    np.testing.assert_allclose(expected.kernels.sum(), 1.0, atol=1e-5)
    pipe.save_pretrained(tmp_path)
    loaded = FastEMDeblurPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.kernel_estimator.config.regularization == regularization
    np.testing.assert_allclose(run(loaded, image).kernels, expected.kernels, atol=1e-6)
    np.testing.assert_allclose(run(loaded, image).images, expected.images, atol=ROUND_TRIP_ATOL)


def test_kernel_carries_no_autograd_graph_between_steps(pipe):
    """The M-step output is data: no graph may grow from one step to the next (memory per step stays flat)."""
    graphs = []

    def inspect_kernel(p, step, timestep, tensors):
        graphs.append((tensors["kernel"].requires_grad, tensors["kernel"].grad_fn, tensors["latents"].grad_fn))
        return tensors

    for kwargs in (dict(), dict(guidance="dps"), dict(em_iterations=2)):
        graphs.clear()
        run(pipe, smooth_images(1), num_inference_steps=4, callback_on_step_end=inspect_kernel,
            callback_on_step_end_tensor_inputs=["latents", "kernel"], **kwargs)
        assert graphs and all(g == (False, None, None) for g in graphs), kwargs


def test_estimator_without_weights_folder_loads_from_its_config(tmp_path):
    pipe = make_pipe()
    pipe.kernel_estimator = None
    pipe.register_modules(kernel_estimator=KernelEstimator(kernel_size=5, regularization="l1"))
    pipe.save_pretrained(tmp_path)
    for weights in (tmp_path / "kernel_estimator").glob("diffusion_pytorch_model*"):
        weights.unlink()  # a hand-written l1 folder: config.json only
    loaded = FastEMDeblurPipeline.from_pretrained(tmp_path)
    assert loaded.kernel_estimator.config.regularization == "l1"
    assert run(loaded, smooth_images(1)).kernels.shape == (1, 5, 5)


@pytest.mark.parametrize("em_iterations", [None, 2])
def test_interrupt_returns_the_state_where_it_stopped(pipe, em_iterations):
    stopped = {}

    def stop(p, step, timestep, tensors):
        if step == 1:
            stopped.update(latents=tensors["latents"].clone(), kernel=tensors["kernel"].clone())
            p._interrupt = True
        return tensors

    out = run(pipe, smooth_images(1), num_inference_steps=3, em_iterations=em_iterations, output_type="latent",
              callback_on_step_end=stop, callback_on_step_end_tensor_inputs=["latents", "kernel"])
    torch.testing.assert_close(out.images, stopped["latents"])  # not a fresh x_T of a later EM run
    torch.testing.assert_close(out.kernels, stopped["kernel"])


def test_measurement_window_is_zero_on_the_margin_and_one_inside():
    from diffusers_blind import FastEMDeblurPipeline

    window = FastEMDeblurPipeline.measurement_window((40, 48), (8, 8, 24, 30), 8, 9, "cpu")
    assert window.shape == (1, 1, 40, 48)
    assert window[..., :8, :].abs().max() == 0 and window[..., :, :8].abs().max() == 0  # reflected margin
    assert window[..., 32:, :].abs().max() == 0 and window[..., :, 38:].abs().max() == 0  # margin + padding
    assert torch.all(window[..., 12:28, 12:34] == 1)  # inside the photograph, past the ramp of 9 // 2 px
    ramp = window[0, 0, 20, 8:12]
    assert torch.all((ramp > 0) & (ramp < 1)) and torch.all(ramp[1:] > ramp[:-1])
    assert torch.all(FastEMDeblurPipeline.measurement_window((40, 48), (0, 0, 40, 48), 0, 9, "cpu") == 1)


def test_sigma_below_the_quantisation_floor_is_raised_to_it():
    from diffusers_blind import FastEMDeblurPipeline
    from diffusers_blind.ops.noise import AUTO_SIGMA_FLOOR

    measurement = torch.rand(2, 3, 8, 8)
    sigma = FastEMDeblurPipeline.prepare_sigma(None, [0.0, 10.0], measurement)
    torch.testing.assert_close(sigma, torch.tensor([AUTO_SIGMA_FLOOR, 10 / 255]))


def coarse_pipe(kernel_size=9):
    torch.manual_seed(0)
    return FastEMDeblurPipeline(tiny_unet(), ddpm(), KernelEstimator(kernel_size=kernel_size, num_iterations=2))


def test_coarse_to_fine_runs_a_half_size_problem_first_and_seeds_the_fine_run(monkeypatch):
    pipe = coarse_pipe()
    pipe.set_progress_bar_config(disable=True)
    calls = []
    original = FastEMDeblurPipeline.__call__

    def spy(self, image, **kwargs):
        calls.append((tuple(image.shape[-2:]) if torch.is_tensor(image) else None, kwargs.get("kernel_size")))
        return original(self, image, **kwargs)

    monkeypatch.setattr(FastEMDeblurPipeline, "__call__", spy)
    steps = []
    out = pipe(smooth_images(1, height=64, width=72), sigma=10, num_inference_steps=10, num_scales=3,
               refine_strength=0.5, generator=torch.manual_seed(0), output_type="pt",
               callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {})
    # 64x72 with a 9 px kernel: one coarser level (32x36, kernel 5); a 5 px kernel stops the pyramid
    assert calls == [((64, 72), None), ((32, 36), 5)]
    assert out.images.shape == (1, 3, 64, 72) and out.kernels.shape == (1, 1, 9, 9)
    assert steps == list(range(5))  # the fine level replays the last half of the schedule, counted from 0
    assert torch.isfinite(out.images).all() and abs(float(out.kernels.sum()) - 1) < 1e-5


def test_one_scale_and_known_kernel_ignore_the_pyramid():
    pipe = coarse_pipe()
    pipe.set_progress_bar_config(disable=True)
    image = smooth_images(1, height=64, width=64)
    single = run(pipe, image, num_scales=1)
    default = run(pipe, image)
    np.testing.assert_array_equal(single.images, default.images)
    known = gaussian_kernel(9, 1.5)
    a, b = run(pipe, image, kernel=known, num_scales=3), run(pipe, image, kernel=known)
    np.testing.assert_array_equal(a.images, b.images)


def test_two_scales_replay_the_last_30_percent_at_full_size_by_default():
    pipe = coarse_pipe()
    pipe.set_progress_bar_config(disable=True)
    image = smooth_images(1, height=64, width=64)
    steps = []
    default = run(pipe, image, num_scales=2, num_inference_steps=10,
                  callback_on_step_end=lambda p, i, t, kw: steps.append(int(t)) or {})
    pipe.scheduler.set_timesteps(10)
    assert steps == pipe.scheduler.timesteps[7:].tolist()  # DEFAULT_REFINE_STRENGTH = 0.3 of 10 steps
    explicit = run(pipe, image, num_scales=2, num_inference_steps=10, refine_strength=0.3)
    np.testing.assert_array_equal(default.images, explicit.images)


def test_coarse_to_fine_is_reproducible_and_full_strength_only_keeps_the_kernel():
    pipe = coarse_pipe()
    pipe.set_progress_bar_config(disable=True)
    image = smooth_images(1, height=64, width=64)
    a, b = run(pipe, image, num_scales=2), run(pipe, image, num_scales=2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.kernels, b.kernels)
    steps = []
    run(pipe, image, num_scales=2, refine_strength=1.0, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {})
    assert steps == [0, 1, 2]


def line_kernel(support, length):
    """A horizontal bar of ``length`` pixels centred in a ``support`` square (sum 1)."""
    kernel = torch.zeros(1, 1, support, support)
    kernel[..., support // 2, support // 2 - length // 2 : support // 2 + length // 2 + 1] = 1
    return kernel / kernel.sum()


def fake_initializer(monkeypatch, full_length, coarse_length):
    """Replace the sparse initializer by one that returns bars of known length; records its calls."""
    import diffusers_blind.pipelines.fast_em.pipeline_fast_em_deblur as module

    calls = []

    class FakeInitializer:
        def __init__(self, estimator):
            pass

        def __call__(self, measurement, kernel_size, sigma):
            coarse = len(calls) == 1
            calls.append((tuple(measurement.shape[-2:]), kernel_size, float(torch.as_tensor(sigma).reshape(-1)[0])))
            return line_kernel(kernel_size, coarse_length if coarse else full_length).expand(measurement.shape[0], -1, -1, -1)

    monkeypatch.setattr(module, "SparseKernelInitializer", FakeInitializer)
    return calls


@pytest.mark.parametrize("estimator_size, length, expected", [(33, 5, 33), (33, 31, 33), (9, 5, 9), (9, 7, 9), (9, 9, 15)])
def test_kernel_size_auto_rounds_the_extent_plus_margin_up_never_below_the_estimator_size(
        monkeypatch, estimator_size, length, expected):
    pipe = coarse_pipe(kernel_size=estimator_size)
    calls = fake_initializer(monkeypatch, length, coarse_length=1)
    size, extent = pipe.select_kernel_size(torch.rand(1, 3, 96, 96), torch.tensor([0.02]))
    assert (size, extent) == (expected, length)
    assert calls[0] == ((96, 96), estimator_size, pytest.approx(0.02))
    # the 2×-downscaled probe needs a half image of at least twice the estimator's size
    assert [call[:2] for call in calls[1:]] == ([] if estimator_size == 33 else [((48, 48), 9)])


def test_kernel_size_auto_uses_the_coarse_probe_only_for_a_blur_longer_than_the_support(monkeypatch):
    pipe = coarse_pipe(kernel_size=33)
    calls = fake_initializer(monkeypatch, 31, coarse_length=21)  # 2·21 − 1 = 41 > 33 + 4: a longer blur
    size, extent = pipe.select_kernel_size(torch.rand(1, 3, 160, 160), torch.tensor([0.02]))
    assert calls[1] == ((80, 80), 33, pytest.approx(0.01))  # half size, half the noise std
    assert (size, extent) == (45, 41)
    calls = fake_initializer(monkeypatch, 13, coarse_length=17)  # 33: within the full probe's support
    assert pipe.select_kernel_size(torch.rand(1, 3, 160, 160), torch.tensor([0.02])) == (33, 13)


def test_kernel_size_auto_stays_within_half_the_image(monkeypatch):
    pipe = coarse_pipe(kernel_size=33)
    calls = fake_initializer(monkeypatch, 9, coarse_length=1)
    size, _ = pipe.select_kernel_size(torch.rand(1, 3, 64, 48), torch.tensor([0.02]))
    assert calls[0][1] == 23  # the probe fits in half the image: (48 // 2 − 1) | 1
    assert size == 23  # 33 (the estimator's size) is larger than half the image: the largest allowed


def test_kernel_size_auto_on_a_real_bar_blur_with_the_shipped_estimator():
    """The real sparse probe (shipped kernel prior) measures a 13 px horizontal motion blur."""
    from diffusers_blind.ops import spatial_blur

    estimator = KernelEstimator.from_pretrained(diffusers_blind.DEFAULT_MODEL, subfolder="kernel_estimator")
    pipe = FastEMDeblurPipeline(tiny_unet(), ddpm(), estimator)
    generator = torch.Generator().manual_seed(0)
    sharp = torch.rand(1, 1, 16, 16, generator=generator)
    sharp = torch.nn.functional.interpolate(sharp, size=(140, 140), mode="nearest").expand(1, 3, -1, -1)  # blocky edges
    blurry = spatial_blur(sharp, line_kernel(13, 13))[..., 6:-6, 6:-6]  # valid part: 128 x 128
    size, extent = pipe.select_kernel_size(blurry, torch.tensor([1.0 / 255]))
    assert 11 <= extent <= 15 and size == 33  # within 2 px; the size is the estimator's (never below it)


def run_auto_end_to_end(pipe, monkeypatch):
    calls = fake_initializer(monkeypatch, 5, coarse_length=1)
    return run(pipe, smooth_images(1, height=64, width=64), kernel_size="auto", kernel_init="dirac", output_type="pt"), calls


def test_kernel_size_auto_sets_the_size_of_the_run(monkeypatch):
    pipe = coarse_pipe()
    pipe.set_progress_bar_config(disable=True)
    out, calls = run_auto_end_to_end(pipe, monkeypatch)
    assert [size for _, size, _ in calls] == [9, 9]  # the probe and the 2×-downscaled probe (estimator size 9)
    assert out.kernels.shape[-1] == 9


def test_kernel_size_auto_errors():
    pipe = coarse_pipe()
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="auto"):
        run(pipe, smooth_images(1, height=64, width=64), kernel_size="big")
    with pytest.raises(ValueError, match="known"):
        run(pipe, smooth_images(1, height=64, width=64), kernel_size="auto", kernel=gaussian_kernel(5, 1.0))
    with pytest.raises(ValueError, match="too small"):
        run(pipe, smooth_images(1, height=16, width=16), kernel_size="auto")


def test_kernel_size_auto_on_an_image_smaller_than_the_estimators_size():
    """A 20×24 photo: "auto" may choose 9 (sizes up to half the short side), so the estimator's 33 must not be
    checked against the image first (it was: "kernel_size 33 is larger than the image")."""
    pipe = FastEMDeblurPipeline(tiny_unet(), ddpm(), KernelEstimator(kernel_size=33, num_iterations=2))
    pipe.set_progress_bar_config(disable=True)
    out = run(pipe, smooth_images(1, height=20, width=24), kernel_size="auto", output_type="pt", num_inference_steps=2)
    assert out.kernels.shape[-1] == 9


def test_reblur_fit_is_about_one_for_the_true_pair_and_large_for_a_wrong_kernel():
    from diffusers_blind.ops import motion_kernel, reblur_fit, spatial_blur, flip_kernel

    g = torch.Generator().manual_seed(0)
    x = smooth_images(2, height=64, width=64)
    kernel = motion_kernel(9, 0.6, generator=0)
    y = spatial_blur(x, flip_kernel(kernel)) + 0.01 * torch.randn(x.shape, generator=g)
    fit = reblur_fit(y, x, kernel, 0.01)
    assert fit.shape == (2,) and torch.all((fit > 0.8) & (fit < 1.2))
    assert torch.all(reblur_fit(y, x, torch.nn.functional.pad(torch.ones(1, 1, 1, 1), (4,) * 4), 0.01) > 2)
    with pytest.raises(ValueError, match="sigma"):
        reblur_fit(y, x, kernel, 0.0)


def test_guard_returns_the_input_when_the_estimate_does_not_explain_it():
    pipe = coarse_pipe(kernel_size=5)
    pipe.set_progress_bar_config(disable=True)
    image = smooth_images(2, height=32, width=32)

    def wreck_first_image(p, i, t, kw):  # the last step's state of image 0 becomes noise
        latents = kw["latents"].clone()
        if i == p.num_timesteps - 1:
            latents[0] = torch.randn(latents[0].shape, generator=torch.Generator().manual_seed(1)) * 3
        return {"latents": latents}

    with pytest.warns(UserWarning, match=r"image 0 does not explain the photo"):
        out = run(pipe, image, sigma=5, output_type="pt", callback_on_step_end=wreck_first_image, guard=True)
    assert out.fallback[0] is True and out.fit[0] > 4 and len(out.fit) == 2
    torch.testing.assert_close(out.images[0], image[0])
    torch.testing.assert_close(out.kernels[0, 0], torch.nn.functional.pad(torch.ones(1, 1), (2, 2, 2, 2)))
    off = run(pipe, image, sigma=5, output_type="pt", callback_on_step_end=wreck_first_image, guard=False)
    assert off.fit is None and off.fallback is None and not torch.allclose(off.images[0], image[0])
    known = run(pipe, image, sigma=5, output_type="pt", kernel=gaussian_kernel(5, 1.0), guard=True)
    assert known.fit is None  # the guard is for blind estimates


def test_guard_returns_the_input_when_the_estimate_collapsed_into_stripes():
    """A wrong kernel with a zero (a 2-pixel box) fitted by full-contrast stripes: the fit is perfect, the
    image is not; the collapse test (saturated mid-tones and a contrast far above the photo's) drops it."""
    pipe = coarse_pipe(kernel_size=5)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 5 / 255
    flat = torch.full((1, 3, 32, 32), 0.5) + noise
    box = torch.zeros(1, 1, 5, 5)
    box[0, 0, 2, 2:4] = 0.5  # averages two neighbouring columns: alternating 0/1 columns blur to 0.5

    def stripes_for_image_0(p, i, t, kw):
        if i < p.num_timesteps - 1:
            return {}
        latents = kw["latents"].clone()
        columns = torch.arange(latents.shape[-1]) % 2
        latents[0] = (columns.float() * 2 - 1).expand_as(latents[0])
        return {"latents": latents, "kernel": box}

    with pytest.warns(UserWarning, match=r"image 0 collapsed into stripes \(100 % of the mid-tones saturated"):
        out = pipe(flat, sigma=5, num_inference_steps=3, output_type="pt", generator=torch.manual_seed(0),
                   callback_on_step_end=stripes_for_image_0, callback_on_step_end_tensor_inputs=["latents", "kernel"])
    assert out.fit[0] < 1.5  # it explains the photo...
    assert out.fallback == [True]  # ...and is dropped all the same
    torch.testing.assert_close(out.images[0], flat[0])


def test_collapse_signs_are_small_for_a_true_pair_and_large_for_stripes():
    from diffusers_blind.ops import contrast_gain, midtone_saturation, motion_kernel, spatial_blur, flip_kernel

    sharp = smooth_images(2, height=64, width=64)
    blurry = spatial_blur(sharp, flip_kernel(motion_kernel(9, 0.6, generator=0)))
    assert torch.all(midtone_saturation(blurry, sharp) < 0.05) and torch.all(contrast_gain(blurry, sharp) < 2)
    assert torch.all(contrast_gain(blurry, blurry) == 1) and contrast_gain(blurry, sharp).shape == (2,)
    stripes = (torch.arange(64) % 2).float().expand_as(sharp)
    gray = torch.full_like(sharp, 0.5) + 0.01 * torch.randn(sharp.shape, generator=torch.Generator().manual_seed(0))
    assert torch.all(midtone_saturation(gray, stripes) == 1) and torch.all(contrast_gain(gray, stripes) > 10)
    assert torch.all(midtone_saturation(torch.zeros_like(sharp), stripes) == 0)  # dark photo: saturation is normal
    with pytest.raises(ValueError, match="differ"):
        midtone_saturation(gray, stripes[..., :32])


def test_guard_keeps_an_estimate_that_explains_the_photo():
    pipe = coarse_pipe(kernel_size=5)
    pipe.set_progress_bar_config(disable=True)
    image = smooth_images(1, height=32, width=32)
    kernel = gaussian_kernel(5, 1.0)

    def perfect(p, i, t, kw):  # the last state: the image whose blur is the measurement, and its kernel
        return {"latents": p.image_processor.pad(sharp, 5, 2)[0] * 2 - 1, "kernel": kernel} if i == p.num_timesteps - 1 else {}

    sharp = smooth_images(1, height=32, width=32, seed=3)
    blurry = fft_blur(sharp, kernel)
    out = pipe(blurry, sigma=5, num_inference_steps=3, output_type="pt", generator=torch.manual_seed(0),
               callback_on_step_end=perfect, callback_on_step_end_tensor_inputs=["latents", "kernel"])
    assert out.fallback == [False] and out.fit[0] < 1
    assert not torch.allclose(out.images, blurry, atol=1e-3)


def test_blind_run_starts_from_the_sparse_initializer_and_holds_it_until_m_step_start(pipe, monkeypatch):
    import diffusers_blind.pipelines.fast_em.pipeline_fast_em_deblur as module

    start = torch.zeros(1, 1, 5, 5)
    start[0, 0, 2, 1:4] = 1 / 3  # a horizontal bar, what the initializer "finds"
    monkeypatch.setattr(module.SparseKernelInitializer, "__call__", lambda self, y, size, sigma: start.expand(y.shape[0], -1, -1, -1))
    kernels = []
    out = run(pipe, smooth_images(), num_inference_steps=4, m_step_start=0.5, output_type="pt",
              callback_on_step_end=lambda p, i, t, kw: kernels.append(kw["kernel"].clone()) or {},
              callback_on_step_end_tensor_inputs=["kernel"])
    held = start.expand(2, -1, -1, -1)
    assert torch.equal(kernels[0], held) and torch.equal(kernels[1], held)  # steps 0, 1 keep the start
    assert not torch.allclose(kernels[3], held)  # steps 2, 3 run the M-step
    assert out.kernels.shape == (2, 1, 5, 5)


def test_kernel_init_dirac_and_a_user_warm_start():
    pipe = make_pipe()
    image = smooth_images()
    kernels = []
    grab = dict(callback_on_step_end=lambda p, i, t, kw: kernels.append(kw["kernel"].clone()) or {},
                callback_on_step_end_tensor_inputs=["kernel"], m_step_start=0.5, num_inference_steps=2)
    run(pipe, image, kernel_init="dirac", **grab)
    assert torch.equal(kernels[0][0, 0], torch.from_numpy(np.pad([[1.0]], 2)).float())
    warm = gaussian_kernel(5, 1.0)
    kernels.clear()
    out = run(pipe, image, kernel_init=warm[0, 0].numpy(), kernel_size=None, **grab)
    assert torch.allclose(kernels[0], warm.expand(2, -1, -1, -1), atol=1e-6) and out.kernels.shape == (2, 5, 5)
    a = run(pipe, image, kernel_init=warm, num_inference_steps=2)
    b = run(pipe, image, kernel_init=warm, num_inference_steps=2)
    np.testing.assert_array_equal(a.images, b.images)


def test_kernel_anchor_holds_an_informative_start_but_not_a_dirac():
    torch.manual_seed(0)
    pipe = FastEMDeblurPipeline(tiny_unet(), ddpm(), KernelEstimator(kernel_size=5, num_iterations=2, regularization="none"))
    pipe.set_progress_bar_config(disable=True)
    image, warm = smooth_images(), gaussian_kernel(5, 1.0)
    kernels = []
    grab = dict(callback_on_step_end=lambda p, i, t, kw: kernels.append(kw["kernel"].clone()) or {},
                callback_on_step_end_tensor_inputs=["kernel"], m_step_start=0.0, num_inference_steps=3)
    run(pipe, image, kernel_init=warm, kernel_anchor=np.float32(1e12), **grab)  # numpy scalars are numbers too
    assert all(torch.allclose(k, warm.expand(2, -1, -1, -1), atol=1e-5) for k in kernels)
    kernels.clear()
    run(pipe, image, kernel_init=warm, kernel_anchor=0.0, **grab)
    assert not torch.allclose(kernels[-1], warm.expand(2, -1, -1, -1), atol=1e-3)  # the free M-step moves it
    kernels.clear()
    run(pipe, image, kernel_init="dirac", kernel_anchor=1e12, **grab)
    assert not torch.allclose(kernels[-1], dirac_kernel(5).expand(2, -1, -1, -1), atol=1e-3)  # a Dirac start is no anchor


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_anchor=-1.0), "kernel_anchor"),
        (dict(kernel_anchor=float("nan")), "kernel_anchor"),
        (dict(kernel_anchor="strong"), "kernel_anchor"),
        (dict(kernel_init="gaussian"), "kernel_init"),
        (dict(kernel_init=torch.ones(1, 1, 3, 3) / 9, kernel_size=5), "kernel_init"),
        (dict(kernel_init=torch.ones(1, 1, 5, 5) / 25, num_scales=2), "num_scales"),
        (dict(kernel_init=-torch.ones(5, 5)), "non-negative"),
        (dict(m_step_start=1.5), "m_step_start"),
        (dict(m_step_start="late"), "m_step_start"),
    ],
)
def test_kernel_init_and_m_step_start_errors(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, smooth_images(), **kwargs)


def test_kernel_size_auto_reuses_the_probe_as_the_sparse_start(monkeypatch):
    """When the chosen size is the probe's, the sparse start kernel is the probe itself (not estimated twice)."""
    pipe = coarse_pipe()
    pipe.set_progress_bar_config(disable=True)
    calls = fake_initializer(monkeypatch, 5, coarse_length=1)
    out = run(pipe, smooth_images(1, height=64, width=64), kernel_size="auto", kernel_init="sparse", m_step_start=1.0,
              output_type="pt")
    assert [size for _, size, _ in calls] == [9, 9]  # the probe and the coarse probe; no third call for the start
    expected = line_kernel(9, 5)
    assert torch.allclose(out.kernels, expected / expected.sum(), atol=1e-6)  # m_step_start = 1 holds the start kernel


def test_strength_runs_the_last_fraction_of_the_schedule_from_the_wiener_start(monkeypatch):
    pipe = make_pipe()
    image = smooth_images(1)
    steps, starts = [], []
    original = FastEMDeblurPipeline.initial_image

    def spy(measurement):
        starts.append(measurement.clone())
        return original(measurement)

    monkeypatch.setattr(FastEMDeblurPipeline, "initial_image", staticmethod(spy))
    out = run(pipe, image, num_inference_steps=10, strength=0.3, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {})
    assert steps == [0, 1, 2] and pipe.num_timesteps == 3  # diffusers' img2img: the steps that run, from 0
    assert len(starts) == 1 and np.isfinite(out.images).all()
    full = run(pipe, image, num_inference_steps=10)
    assert not np.allclose(full.images, out.images)  # a different start, not the default run
    np.testing.assert_array_equal(run(pipe, image, num_inference_steps=10, strength=1.0).images, full.images)
    np.testing.assert_array_equal(run(pipe, image, num_inference_steps=10, strength=0.3).images, out.images)


def test_strength_start_is_the_noised_photo(monkeypatch):
    """At the start level ``x_t = √ᾱ·(2·y − 1) + √(1−ᾱ)·ε`` on the padded grid (SDEdit), blind or not."""
    pipe = make_pipe()
    image = smooth_images(1, height=16, width=16)
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for kernel in (gaussian_kernel(5, 1.0), None):
        captured = {}

        def first_step(self, denoiser, problem, state, step_index, t, step_kwargs):
            captured.setdefault("x_t", state.latents.clone())
            captured.setdefault("t", int(t))
            self._interrupt = True
            return state

        monkeypatch.setattr(FastEMDeblurPipeline, "denoising_step", first_step)
        run(pipe, image, kernel=kernel, sigma=5, num_inference_steps=4, strength=0.5, boundary_margin=0, latents=noise)
        alpha_bar = pipe.scheduler.alphas_cumprod[captured["t"]]
        expected = alpha_bar.sqrt() * (image * 2 - 1) + (1 - alpha_bar).sqrt() * noise
        assert captured["t"] == int(pipe.scheduler.timesteps[2])
        torch.testing.assert_close(captured["x_t"], expected, atol=1e-5, rtol=1e-5)


def test_a_callback_returning_none_changes_nothing(pipe):
    expected = run(pipe, smooth_images(1)).images
    got = run(pipe, smooth_images(1), callback_on_step_end=lambda p, step, t, tensors: None).images
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_strength_callback_counts_the_steps_that_run_and_keeps_the_m_step_start():
    """``strength < 1``: the callback's index runs 0..num_timesteps−1; ``m_step_start`` stays a fraction of the full schedule."""
    pipe = make_pipe()
    seen = []

    def record(p, i, t, tensors):
        seen.append((i, int(t), i == p.num_timesteps - 1, tensors["kernel"].clone()))
        return tensors

    run(pipe, smooth_images(1), num_inference_steps=4, strength=0.5, m_step_start=0.75, kernel_init="dirac",
        kernel_anchor=0.0, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["kernel"])
    assert [s[0] for s in seen] == [0, 1] and pipe.num_timesteps == 2
    assert [s[1] for s in seen] == [int(t) for t in pipe.scheduler.timesteps[2:]]
    assert [s[2] for s in seen] == [False, True]
    # M-step from full-schedule step round(0.75 · 4) = 3: the first step that runs (full index 2) keeps the start
    torch.testing.assert_close(seen[0][3], dirac_kernel(5, 1))
    assert not torch.allclose(seen[1][3], dirac_kernel(5, 1))


def test_interrupt_from_the_full_size_callback_stops_a_coarse_to_fine_run():
    pipe = coarse_pipe()
    pipe.set_progress_bar_config(disable=True)
    steps, stopped = [], {}

    def stop(p, i, t, tensors):
        steps.append(i)
        stopped.update(latents=tensors["latents"].clone())
        p._interrupt = True
        return tensors

    out = run(pipe, smooth_images(1, height=64, width=64), num_scales=2, num_inference_steps=4, output_type="latent",
              callback_on_step_end=stop)
    assert steps == [0] and pipe.interrupt
    torch.testing.assert_close(out.images, stopped["latents"])


def test_interrupt_during_a_coarser_level_returns_its_image_without_running_the_full_size_level(monkeypatch):
    pipe = coarse_pipe()
    pipe.set_progress_bar_config(disable=True)
    original = FastEMDeblurPipeline.denoising_step
    sizes = []

    def step(self, denoiser, problem, state, step_index, t, step_kwargs):
        sizes.append(tuple(state.latents.shape[-2:]))
        self._interrupt = True  # as a stop button would, during the first (coarse) step
        return original(self, denoiser, problem, state, step_index, t, step_kwargs)

    coarse = {}
    original_coarse = FastEMDeblurPipeline.coarse_estimate

    def spy(self, *args):
        coarse["image"], coarse["kernel"] = original_coarse(self, *args)
        return coarse["image"], coarse["kernel"]

    monkeypatch.setattr(FastEMDeblurPipeline, "denoising_step", step)
    monkeypatch.setattr(FastEMDeblurPipeline, "coarse_estimate", spy)
    steps = []
    out = run(pipe, smooth_images(1, height=64, width=64), num_scales=2, num_inference_steps=4, output_type="pt",
              callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert len(sizes) == 1 and sizes[0][0] < 64  # one coarse step, nothing at full size
    assert steps == [] and pipe.interrupt
    assert out.images.shape == (1, 3, 64, 64) and out.kernels.shape == (1, 1, 9, 9)
    assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
    # the coarse level's (interrupted) image upsampled and its kernel, not a noised start of the full-size level
    torch.testing.assert_close(out.images, coarse["image"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.kernels, coarse["kernel"])


def test_even_and_non_square_kernels_follow_the_centre_convention(pipe):
    """docs/conventions.md: a (kh, kw) kernel has its centre at (kh // 2, kw // 2), odd or even; FastEM accepts them."""
    blind = run(pipe, smooth_images(1), kernel_size=4, boundary_margin=np.int64(4))
    assert blind.kernels.shape == (1, 4, 4) and abs(float(blind.kernels.sum()) - 1) < 1e-5
    known = run(pipe, smooth_images(1), kernel=np.ones((3, 5)) / 15)
    assert known.kernels.shape == (1, 3, 5) and np.isfinite(known.images).all()


def test_fast_em_refuses_a_scheduler_without_the_ddpm_step():
    import diffusers

    pipe = make_pipe()
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # ran, silently wrong
    with pytest.raises(TypeError, match="DDPMScheduler or a DDIMScheduler"):
        pipe(smooth_images(1, 3, 16, 16), sigma=10, num_inference_steps=2, kernel_size=5)


def test_step_end_callback_replacements_are_checked(pipe):
    image = smooth_images(1, 3, 16, 16)

    def returning(**values):
        return lambda p, i, t, tensors: values

    negative = -torch.ones(1, 1, 5, 5) / 25
    with pytest.raises(ValueError, match="negative"):
        run(pipe, image, callback_on_step_end=returning(kernel=negative))
    with pytest.raises(ValueError, match=r"it must keep \(1, 1, 5, 5\)"):
        run(pipe, image, callback_on_step_end=returning(kernel=torch.ones(1, 1, 3, 3) / 9))
    with pytest.raises(ValueError, match="NaN"):
        run(pipe, image, callback_on_step_end=returning(kernel=torch.full((1, 1, 5, 5), float("nan"))))
    with pytest.raises(TypeError, match="dict of tensors"):
        run(pipe, image, callback_on_step_end=lambda p, i, t, tensors: [tensors["latents"]])
    scaled = run(pipe, image, output_type="pt", callback_on_step_end=returning(kernel=torch.ones(1, 1, 5, 5) / 5))
    assert abs(float(scaled.kernels.sum()) - 1) < 1e-5  # blind: sums to 5, rescaled to 1 as the M-step's
    half = torch.ones(5, 5) / 50  # a known kernel is used as given, also when a callback hands back a copy
    copied = run(pipe, image, kernel=half, output_type="pt",
                 callback_on_step_end=lambda p, i, t, tensors: {"kernel": tensors["kernel"].clone()},
                 callback_on_step_end_tensor_inputs=["kernel"])
    plain = run(pipe, image, kernel=half, output_type="pt")
    assert abs(float(copied.kernels.sum()) - 0.5) < 1e-5 and torch.equal(copied.images, plain.images)
    seen = []

    def double_latents(p, i, t, tensors):
        seen.append(tensors["latents"].dtype)
        return {"latents": tensors["latents"].double()}  # cast back to the run's dtype, not a crash in the UNet

    run(pipe, image, callback_on_step_end=double_latents)
    assert seen and all(dtype == torch.float32 for dtype in seen)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(strength="0.5"), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength=torch.tensor(0.5)), ValueError, "strength must be a number"),
    (dict(m_step_start="0.5"), ValueError, r"m_step_start must be a number in \[0, 1\]"),
    (dict(m_step_start=True), ValueError, "m_step_start must be a number"),
    (dict(num_scales=2, refine_strength="0.5"), ValueError, "refine_strength must be a number"),
    (dict(kernel=np.float32(1.0)), ValueError, r"kernel must be a \(k, k\)"),
    (dict(kernel_init=None), ValueError, "kernel_init must be one of"),
    (dict(generator=0), TypeError, "torch.Generator"),
    (dict(kernel_size="auto", kernel_init=torch.ones(5, 5) / 25), ValueError, "pass one of them"),
])
def test_odd_arguments_give_clear_errors(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(smooth_images(1, 3, 16, 16), sigma=10, num_inference_steps=2, **kwargs)


def test_numpy_integers_and_no_callback_tensors_are_accepted(pipe):
    out = run(pipe, smooth_images(1, 3, 16, 16), num_inference_steps=np.int64(2), num_particles=np.int64(2),
              kernel_size=np.int64(5), callback_on_step_end_tensor_inputs=None)
    assert out.kernels.shape == (1, 5, 5)
    reference = run(pipe, smooth_images(1, 3, 16, 16), num_inference_steps=2, num_particles=2, kernel_size=5)
    np.testing.assert_array_equal(out.images, reference.images)


def test_the_coarse_level_reports_the_noise_level_it_used(pipe):
    """The blind floor (5 levels) applies at the coarse level too: σ = 6 halves to 3, and runs at 5."""
    out, _, used, factor = pipe.run_downscaled(smooth_images(1, 3, 32, 32), torch.tensor([6 / 255]),
                                               num_inference_steps=2, kernel_size=5, blind_sigma_floor=5.0)
    assert factor == 2 and out.sigma == pytest.approx([5.0]) and float(used) * 255 == pytest.approx(5.0)


@pytest.mark.parametrize("output_type", ["pt", "np", "latent"])
def test_a_known_kernel_is_never_shared_with_the_outputs(output_type):
    pipe = make_pipe(estimator=False)
    kernel = gaussian_kernel(5, 1.0)[0, 0].clone()
    given = kernel.clone()
    out = run(pipe, smooth_images(2), kernel=kernel, output_type=output_type)
    kernels = torch.as_tensor(np.asarray(out.kernels)) if output_type == "np" else out.kernels
    kernel *= 2  # the caller edits its kernel afterwards
    kernels[0] *= 3  # or the first returned kernel
    torch.testing.assert_close(kernels[1].reshape(5, 5), given)
    torch.testing.assert_close(kernels[0].reshape(5, 5), 3 * given)


def test_a_folder_of_another_pipeline_loads_with_a_warning(tmp_path):
    """BlindDPS's guidance_scale means something else in Fast EM: loading its folder says so."""
    import warnings

    import diffusers_blind
    from diffusers_blind import BlindDPSTurbulencePipeline

    with pytest.warns(UserWarning, match="saved by BlindDPSPipeline, not FastEMDeblurPipeline"):
        FastEMDeblurPipeline.from_pretrained(diffusers_blind.BLIND_DPS_DEFAULT_MODEL)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*saved by")
        BlindDPSTurbulencePipeline.from_pretrained(diffusers_blind.BLIND_DPS_DEFAULT_MODEL)  # a subclass: no warning
        make_pipe().save_pretrained(tmp_path)
        FastEMDeblurPipeline.from_pretrained(tmp_path)


def test_the_image_processor_builds_the_pipelines_grid_for_latents(pipe):
    """34 + 2·5 = 44 = 4·11 is rounded to 48 for the FFTs; ``pipe.image_processor.pad`` must agree."""
    image = smooth_images(1, height=34, width=34)
    grid = pipe.image_processor.pad(image, 5)[0]
    assert grid.shape[-2:] == (48, 48)
    noise = torch.randn(grid.shape, generator=torch.Generator().manual_seed(0))
    out = run(pipe, image, kernel=torch.full((1, 1, 5, 5), 1 / 25), sigma=5, num_inference_steps=2, latents=noise,
              output_type="pt")
    assert out.images.shape[-2:] == (34, 34)


def test_fft_rounding_does_not_tip_a_512_photo_into_tiles():
    """512 + 2·33 = 578 → 584 for the UNet → 600 for the FFTs; the plan is made for 584, which runs whole."""
    pipe = make_pipe()
    kernel = torch.zeros(1, 1, 33, 33)
    kernel[..., 16, 16] = 1
    out = run(pipe, torch.full((1, 3, 512, 512), 0.5), kernel=kernel, sigma=5, num_inference_steps=1, output_type="pt")
    assert pipe.tiling_plan.tile_size is None, pipe.tiling_plan
    assert out.images.shape[-2:] == (512, 512)


def test_a_wrong_latents_grid_names_the_helper_that_builds_the_right_one(pipe):
    image = smooth_images(1, height=34, width=34)
    with pytest.raises(ValueError, match=r"image_processor\.pad"):
        run(pipe, image, kernel=torch.full((1, 1, 5, 5), 1 / 25), sigma=5, num_inference_steps=2,
            latents=torch.zeros(1, 3, 44, 44))
