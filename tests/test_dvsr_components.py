"""DvSR components: the continuous noise-level scheduler, the predictor, the training pairs and loss."""

import math

import pytest
import torch

from diffusers_blind import ContinuousNoiseLevelScheduler, DeblurPredictor
from diffusers_blind.models import build_dvsr_denoiser
from diffusers_blind.ops import fft_blur, gaussian_kernel
from diffusers_blind.pipelines.dvsr.training_utils import (
    blur_valid,
    dvsr_loss,
    embed_kernel_centred,
    make_blurry_sharp_pair,
    random_training_kernels,
)


def tiny_models(seed=0):
    torch.manual_seed(seed)
    predictor = DeblurPredictor(block_out_channels=(8, 16), layers_per_block=1)
    denoiser = build_dvsr_denoiser(block_out_channels=(8, 16), norm_num_groups=4)
    return predictor, denoiser


# ------------------------------------------------------------------ scheduler
def test_training_levels_stay_within_their_interval():
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=50, beta_start=1e-3, beta_end=0.2)
    levels, index = scheduler.sample_training_levels(5000, generator=torch.Generator().manual_seed(0))
    table = scheduler.train_sqrt_alphas_cumprod.float()
    low, high = table[index], table[index - 1]
    assert index.min() >= 1 and index.max() <= 50
    assert (levels >= low - 1e-7).all() and (levels <= high + 1e-7).all()
    # the draw is continuous: within one interval the levels are spread, not only at the ends
    inside = levels[index == 25]
    span = float(high[index == 25][0] - low[index == 25][0])
    assert inside.numel() > 20 and float(inside.max() - inside.min()) > 0.5 * span


def test_noise_level_timestep_round_trip_and_order():
    scheduler = ContinuousNoiseLevelScheduler()
    levels = torch.tensor([0.01, 0.3, 0.7, 0.99, 0.99999], dtype=torch.float64)
    timesteps = scheduler.noise_level_to_timestep(levels)
    assert (timesteps[1:] < timesteps[:-1]).all()  # cleaner level → smaller conditioning value
    assert torch.allclose(scheduler.timestep_to_noise_level(timesteps), levels, rtol=1e-5)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        scheduler.noise_level_to_timestep(torch.tensor([1.5]))


def test_set_timesteps_variants_and_errors():
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(7)
    assert scheduler.num_inference_steps == 7 and len(scheduler.timesteps) == 7
    assert (scheduler.sqrt_alphas_cumprod[1:] > scheduler.sqrt_alphas_cumprod[:-1]).all()
    assert math.isclose(float(scheduler.sqrt_alphas_cumprod[0]), float(scheduler.train_sqrt_alphas_cumprod[-1]))
    scheduler.set_timesteps(sqrt_alphas_cumprod=[0.1, 0.5, 0.9])
    assert torch.allclose(scheduler.timestep_to_noise_level(scheduler.timesteps), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), rtol=1e-5)
    scheduler.set_timesteps(betas=[0.1, 0.2, 0.5])
    expected = torch.tensor([0.9 * 0.8 * 0.5, 0.9 * 0.8, 0.9], dtype=torch.float64).sqrt()
    assert torch.allclose(scheduler.sqrt_alphas_cumprod, expected)
    for kwargs in ({}, {"num_inference_steps": 0}, {"num_inference_steps": 101}, {"sqrt_alphas_cumprod": [0.5, 0.2]},
                   {"betas": [1.5]}, {"num_inference_steps": 3, "betas": [0.1]}):
        with pytest.raises(ValueError):
            scheduler.set_timesteps(**kwargs)


def test_step_with_true_noise_lands_on_the_forward_process():
    """With ε̂ = ε and η = 0 the step maps z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε to √ᾱ_prev z0 + √(1−ᾱ_prev) ε; the last step returns z0."""
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100, clip_sample=False)
    scheduler.set_timesteps(sqrt_alphas_cumprod=[0.2, 0.6])
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    z = 0.2 * z0 + math.sqrt(1 - 0.04) * eps
    out = scheduler.step(eps, scheduler.timesteps[0], z, eta=0.0)
    assert torch.allclose(out.pred_original_sample, z0, atol=1e-5)
    assert torch.allclose(out.prev_sample, 0.6 * z0 + math.sqrt(1 - 0.36) * eps, atol=1e-5)
    last = scheduler.step(eps, scheduler.timesteps[1], out.prev_sample, eta=1.0)
    assert torch.allclose(last.prev_sample, z0, atol=1e-5)  # ᾱ_prev = 1: no noise added at the end


def test_step_counts_its_position_when_timesteps_coincide():
    """Levels 1e-6 and 1e-5 both clip to log-SNR −20 (timestep 1000): the second step used to reuse the first's levels."""
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100, clip_sample=False)
    levels = [1e-6, 1e-5, 0.5]
    scheduler.set_timesteps(sqrt_alphas_cumprod=levels)
    assert scheduler.timesteps[0] == scheduler.timesteps[1]
    g = torch.Generator().manual_seed(0)  # float64: ẑ0 divides by √ᾱ = 1e-6
    z0, eps = (torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    z = scheduler.add_noise_at_level(z0, eps, torch.tensor([levels[0]]))
    seen = []
    for i, t in enumerate(scheduler.timesteps):
        level = torch.tensor([levels[i]])
        output = scheduler.predict_epsilon(eps, z, level)  # the true ε at this level
        z = scheduler.step(output, t, z, eta=0.0).prev_sample
        seen.append(scheduler.step_index)
        following = levels[i + 1] if i + 1 < len(levels) else 1.0
        assert torch.allclose(z, scheduler.add_noise_at_level(z0, eps, torch.tensor([following])), atol=1e-6)
    assert seen == [1, 2, 3]
    # set_timesteps resets the counter; set_begin_index starts the chain at the second of the equal timesteps
    scheduler.set_timesteps(sqrt_alphas_cumprod=levels)
    assert scheduler.step_index is None and scheduler.begin_index is None
    scheduler.set_begin_index(1)
    z = scheduler.add_noise_at_level(z0, eps, torch.tensor([levels[1]]))
    out = scheduler.step(eps, scheduler.timesteps[1], z, eta=0.0).prev_sample
    assert torch.allclose(out, scheduler.add_noise_at_level(z0, eps, torch.tensor([0.5])), atol=1e-6)
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_are_read_consistently(prediction_type):
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100, clip_sample=False, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    level = torch.tensor([0.05, 0.5, 0.99])
    z = scheduler.add_noise_at_level(z0, eps, level)
    s, c = level.view(-1, 1, 1, 1), (1 - level.view(-1, 1, 1, 1) ** 2).sqrt()
    output = {"epsilon": eps, "v_prediction": s * eps - c * z0, "sample": z0}[prediction_type]
    assert torch.allclose(scheduler.predict_epsilon(output, z, level), eps, atol=1e-4)
    assert torch.allclose(scheduler.predict_original(output, z, level), z0, atol=1e-3)
    assert torch.allclose(scheduler.predict_velocity(output, z, level), s * eps - c * z0, atol=1e-3)
    scheduler.set_timesteps(sqrt_alphas_cumprod=[0.5, 0.8])
    out = scheduler.step(output[1:2], scheduler.timesteps[0], z[1:2], eta=0.0)
    assert torch.allclose(out.prev_sample, 0.8 * z0[1:2] + 0.6 * eps[1:2], atol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        ContinuousNoiseLevelScheduler(prediction_type="flow")


def test_step_eta_controls_randomness_and_add_noise(tmp_path):
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(5)
    z, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = scheduler.timesteps[1]
    a = scheduler.step(eps, t, z, eta=0.0, generator=torch.Generator().manual_seed(0)).prev_sample
    b = scheduler.step(eps, t, z, eta=0.0, generator=torch.Generator().manual_seed(1)).prev_sample
    c = scheduler.step(eps, t, z, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
    d = scheduler.step(eps, t, z, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(a, b) and not torch.allclose(c, d)
    with pytest.raises(ValueError, match="not in the current schedule"):
        scheduler.step(eps, 123.456, z)
    level = scheduler.sqrt_alphas_cumprod[2]
    noisy = scheduler.add_noise(z, eps, scheduler.timesteps[2:3])
    assert torch.allclose(noisy, float(level) * z + math.sqrt(1 - float(level) ** 2) * eps, atol=1e-5)
    scheduler.save_pretrained(tmp_path)
    loaded = ContinuousNoiseLevelScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }
    assert torch.equal(loaded.train_sqrt_alphas_cumprod, scheduler.train_sqrt_alphas_cumprod)


# ------------------------------------------------------------------ models
@pytest.mark.parametrize("size", [(8, 8), (16, 24), (40, 8)])
def test_predictor_is_identity_at_init_and_fully_convolutional(size):
    predictor, _ = tiny_models()
    y = torch.rand(2, 3, *size) * 2 - 1
    assert torch.equal(predictor(y), y)  # zero-initialised output layer + global skip
    with pytest.raises(ValueError, match="multiples of 2"):
        predictor(torch.rand(1, 3, 9, 8))


def test_predictor_save_load(tmp_path):
    predictor, _ = tiny_models()
    torch.nn.init.normal_(predictor.conv_out.weight, std=0.1)
    predictor.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DeblurPredictor.from_pretrained(tmp_path)
    y = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded(y), predictor(y)) and not torch.equal(predictor(y), y)


def test_denoiser_has_no_attention_and_takes_float_levels():
    _, denoiser = tiny_models()
    assert denoiser.config.in_channels == 6 and denoiser.config.out_channels == 3
    assert not any("Attention" in type(module).__name__ for module in denoiser.modules())
    out = denoiser(torch.randn(2, 6, 8, 24), torch.tensor([123.4, 567.8])).sample
    assert out.shape == (2, 3, 8, 24)


# ------------------------------------------------------------------ training data and loss
def test_blur_valid_equals_circular_blur_in_the_interior():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 30, 30, generator=g)
    kernel = torch.rand(2, 1, 7, 7, generator=g)
    kernel = kernel / kernel.sum((-2, -1), keepdim=True)
    valid = blur_valid(image, kernel)
    assert valid.shape == (2, 3, 24, 24)
    assert torch.allclose(valid, fft_blur(image, kernel)[..., 3:27, 3:27], atol=1e-5)


def test_make_pair_with_a_dirac_and_no_noise_is_the_centre_crop():
    large = torch.rand(2, 3, 20, 20)
    dirac = embed_kernel_centred(torch.ones(1, 1, 1, 1), 5).expand(2, 1, 5, 5)
    blurry, sharp = make_blurry_sharp_pair(large, dirac, 0.0, quantize=False)
    assert sharp.shape == (2, 3, 16, 16) and torch.allclose(blurry, sharp)
    assert torch.equal(sharp, large[..., 2:18, 2:18])
    noisy, _ = make_blurry_sharp_pair(large, dirac, 10 / 255, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, (noisy * 255).round() / 255)  # 8-bit quantised
    assert 5 / 255 < float((noisy - sharp).std()) < 15 / 255


def test_random_training_kernels_are_valid():
    kernels = random_training_kernels(12, generator=0, max_size=21, min_motion_size=9)
    assert kernels.shape == (12, 1, 21, 21)
    assert (kernels >= 0).all() and torch.allclose(kernels.sum((-2, -1)), torch.ones(12, 1), atol=1e-5)
    assert torch.equal(kernels, random_training_kernels(12, generator=0, max_size=21, min_motion_size=9))
    with pytest.raises(ValueError):
        embed_kernel_centred(gaussian_kernel(6, 1.0), 21)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    sharp = torch.nn.functional.interpolate(torch.rand(4, 3, 5, 5, generator=g), size=(16, 16), mode="bicubic").clamp(0, 1)
    blurry = fft_blur(sharp, gaussian_kernel(5, 1.0))
    return blurry * 2 - 1, sharp * 2 - 1


def test_one_training_step_lowers_the_loss():
    predictor, denoiser = tiny_models()
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100)
    blurry, sharp = _batch()
    params = list(predictor.parameters()) + list(denoiser.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05)

    def loss():
        return dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, generator=torch.Generator().manual_seed(3))

    before = loss()
    before["loss"].backward()
    assert all(p.grad is not None for p in predictor.parameters())  # the ε loss reaches g through the residual
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert float(after["loss"]) < float(before["loss"].detach())


def test_loss_modes():
    predictor, denoiser = tiny_models()
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100)
    blurry, sharp = _batch()
    only_g = dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, mode="predictor")
    assert torch.allclose(only_g["loss"], ((blurry - sharp) ** 2).mean())  # the untrained predictor is the identity
    joint = dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, generator=torch.Generator().manual_seed(0))
    weighted = dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, generator=torch.Generator().manual_seed(0),
                         predictor_loss_weight=2.0)
    assert torch.allclose(weighted["loss"], joint["eps_l1"] + 2.0 * joint["predictor_l2"])
    with pytest.raises(ValueError, match="mode"):
        dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, mode="other")
    with pytest.raises(ValueError, match="residual_scale"):
        dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, residual_scale=0.0)


def test_residual_scale_divides_the_diffused_residual():
    """With ε-prediction and a denoiser that returns 0, ε̂ = 0, so the loss is E|ε| whatever the scale; with
    sample-prediction and f = 0 the implied ε̂ = z/√(1−ᾱ) differs from ε by √ᾱ·r/(s·√(1−ᾱ)): a smaller s gives a larger loss."""
    predictor, _ = tiny_models()
    blurry, sharp = _batch()

    class Zero(torch.nn.Module):
        def forward(self, x, t):
            from types import SimpleNamespace

            return SimpleNamespace(sample=torch.zeros_like(x[:, :3]))

    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100, prediction_type="sample")
    losses = [float(dvsr_loss(predictor, Zero(), scheduler, sharp, blurry, generator=torch.Generator().manual_seed(0),
                              residual_scale=s)["eps_l1"].detach()) for s in (1.0, 0.1)]
    assert losses[1] > losses[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_v_loss_target_is_the_eps_loss_divided_by_the_level(prediction_type):
    """With one level per batch, L1 on v = (L1 on ε) / √ᾱ for every prediction type."""
    predictor, denoiser = tiny_models()
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    blurry, sharp = _batch()
    blurry, sharp = blurry[:1], sharp[:1]
    losses = {target: dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, generator=torch.Generator().manual_seed(5),
                                loss_target=target, residual_scale=0.5) for target in ("epsilon", "v")}
    level, _ = scheduler.sample_training_levels(1, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(losses["v"]["eps_l1"], losses["epsilon"]["eps_l1"])
    assert torch.allclose(losses["v"]["loss"] * level[0], losses["epsilon"]["loss"], rtol=1e-3)
    with pytest.raises(ValueError, match="loss_target"):
        dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, loss_target="x0")


def test_l2_norm_and_the_denoiser_only_mode():
    """``loss_norm="l2"`` is the mean squared ε error of the same draw; ``mode="denoiser"`` sends no gradient into g."""
    predictor, denoiser = tiny_models()
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=100)
    blurry, sharp = _batch()
    level, _ = scheduler.sample_training_levels(sharp.shape[0], generator=torch.Generator().manual_seed(2))
    l2 = dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, generator=torch.Generator().manual_seed(2), loss_norm="l2")
    # recompute the same draw by hand: same generator order (levels, then noise)
    g = torch.Generator().manual_seed(2)
    level, _ = scheduler.sample_training_levels(sharp.shape[0], generator=g)
    noise = torch.randn(sharp.shape, generator=g)
    residual = sharp - predictor(blurry)
    noisy = scheduler.add_noise_at_level(residual, noise, level)
    out = denoiser(torch.cat([noisy, blurry], 1), scheduler.noise_level_to_timestep(level)).sample
    eps = scheduler.predict_epsilon(out, noisy, level)
    assert torch.allclose(l2["loss"], ((eps - noise) ** 2).mean(), rtol=1e-5)
    assert torch.allclose(l2["eps_l1"], (eps - noise).abs().mean(), rtol=1e-5)

    frozen = dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, generator=torch.Generator().manual_seed(2),
                       mode="denoiser", loss_norm="l2")
    assert torch.allclose(frozen["loss"], l2["loss"])
    frozen["loss"].backward()
    assert all(p.grad is None for p in predictor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in denoiser.parameters())
    with pytest.raises(ValueError, match="loss_norm"):
        dvsr_loss(predictor, denoiser, scheduler, sharp, blurry, loss_norm="huber")


def test_predictor_asks_for_a_batch_axis():
    predictor = DeblurPredictor(block_out_channels=(8, 16), layers_per_block=1)
    with pytest.raises(ValueError, match=r"add a batch axis"):
        predictor(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        predictor(torch.zeros(1, 1, 16, 16))
