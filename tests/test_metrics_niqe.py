"""The offline NIQE: distribution fits, MSCN, the shipped pristine model, and the fitting command."""

import numpy as np
import pytest
import torch

from diffusers_blind import metrics
from diffusers_blind.metrics import niqe_offline as niqe_module
from diffusers_blind.ops import fft_blur, gaussian_kernel


def pink_noise(size=192, seed=0, channels=3):
    """A 1/f random field (natural-image-like spectrum) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    freq = torch.fft.fftfreq(size)
    radius = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt().clamp_min(1 / size)
    spectrum = torch.fft.fft2(torch.randn(channels, size, size, generator=g)) / radius
    field = torch.fft.ifft2(spectrum).real
    field = (field - field.amin((-2, -1), keepdim=True)) / (field.amax((-2, -1), keepdim=True) - field.amin((-2, -1), keepdim=True))
    return field[None]


def test_ggd_and_aggd_fits_recover_known_shapes():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(2, 200_000, generator=g, dtype=torch.float64) * 0.5
    alpha, var = niqe_module._ggd_fit(gauss)
    assert torch.allclose(alpha, torch.full((2,), 2.0, dtype=torch.float64), atol=0.05)
    assert torch.allclose(var, torch.full((2,), 0.25, dtype=torch.float64), rtol=0.02)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1, 200_000)).double()
    assert abs(float(niqe_module._ggd_fit(laplace)[0][0]) - 1.0) < 0.05
    alpha, eta, left, right = niqe_module._aggd_fit(gauss)
    assert torch.allclose(alpha, torch.full((2,), 2.0, dtype=torch.float64), atol=0.1)
    assert eta.abs().max() < 0.01 and torch.allclose(left, right, rtol=0.02)
    skewed = torch.where(gauss > 0, gauss * 2, gauss)  # wider right side → positive mean parameter
    _, eta, left, right = niqe_module._aggd_fit(skewed)
    assert (eta > 0).all() and (right > 3 * left).all()


def test_mscn_of_flat_and_scaled_images():
    flat = torch.full((1, 1, 32, 32), 100.0, dtype=torch.float64)
    coeffs, sigma = niqe_module.mscn(flat)
    assert coeffs.abs().max() < 1e-9 and sigma.abs().max() < 1e-5  # sqrt of a rounding error
    y = niqe_module.luminance(pink_noise(64))
    assert y.shape == (1, 1, 64, 64) and 0 <= float(y.min()) and float(y.max()) <= 255


def test_niqe_rises_with_blur_and_is_channel_consistent():
    x = pink_noise(192)
    scores = [float(metrics.niqe(x if std == 0 else fft_blur(x, gaussian_kernel(25, std)))) for std in (0, 1.5, 3.0)]
    assert scores[0] < scores[1] < scores[2]
    gray = niqe_module.luminance(x) / 255
    assert torch.allclose(metrics.niqe(gray), metrics.niqe(gray.expand(-1, 3, -1, -1)), atol=1e-6)
    small = metrics.niqe(pink_noise(40))  # smaller than a patch: one patch of the whole image
    assert small.shape == (1,) and torch.isfinite(small).all()
    with pytest.raises(ValueError, match="at least 8x8"):
        metrics.niqe(torch.rand(1, 3, 6, 6))


def test_niqe_refuses_nan():
    x = pink_noise(40)
    x[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metrics.niqe(x)


def test_niqe_rescales_integer_levels_and_refuses_other_ranges():
    from diffusers_blind.metrics.niqe_offline import niqe as offline_niqe

    x = pink_noise(96).clamp(0, 1)
    levels = (x * 255).round().to(torch.uint8)
    expected = metrics.niqe(levels.double() / 255)
    for function in (metrics.niqe, offline_niqe):
        assert function(levels).tolist() == pytest.approx(expected.tolist(), rel=1e-5)  # uint8 read as [0, 1]
        with pytest.raises(ValueError, match="far outside"):
            function(x * 255)
        with pytest.raises(ValueError, match="far outside"):
            function(x * 4 - 2)  # far below zero: not a [0, 1] image


def test_shipped_pristine_model():
    mean, cov, patch_size = niqe_module.load_niqe_model()
    assert mean.shape == (36,) and cov.shape == (36, 36) and patch_size == 96
    assert torch.allclose(cov, cov.T) and torch.linalg.eigvalsh(cov).min() > -1e-8
    assert metrics.metric_status("niqe") is None and "niqe" in metrics.available_metrics()


def test_fit_and_command_line(tmp_path):
    photos = [pink_noise(96, seed=s) for s in range(3)]
    with pytest.raises(ValueError, match="pristine patches"):
        niqe_module.fit_niqe_model(photos, patch_size=96)  # 3 patches cannot estimate a 36×36 covariance
    mean, cov, count = niqe_module.fit_niqe_model([pink_noise(384, seed=s) for s in range(4)], patch_size=32)
    assert count > 36 and mean.shape == (36,) and np.isfinite(cov).all()
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for s in range(3):
        array = (pink_noise(256, seed=s)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{s}.png")
    out = tmp_path / "model.npz"
    assert niqe_module.main(["fit", str(folder), str(out), "--patch_size", "32"]) == 0
    own = niqe_module.niqe(pink_noise(192, seed=7), str(out))
    blurred = niqe_module.niqe(fft_blur(pink_noise(192, seed=7), gaussian_kernel(25, 3.0)), str(out))
    assert float(own) < float(blurred)
    with pytest.raises(SystemExit, match="exists"):
        niqe_module.main(["fit", str(folder), str(out)])
