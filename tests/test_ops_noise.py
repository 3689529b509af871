"""The single-image noise estimator on synthetic smooth images, and its exact transform."""

import numpy as np
import pytest
import torch

from diffusers_blind.ops import estimate_noise_sigma, fft_blur, gaussian_kernel


def smooth_test_images(size: int = 64, seed: int = 0) -> torch.Tensor:
    """Three smooth-ish RGB images in [0, 1]: a gradient with bumps, a low-pass random field, blurred shapes."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.linspace(0, 1, size, dtype=torch.float64)[:, None]
    c = torch.linspace(0, 1, size, dtype=torch.float64)[None]
    bumps = 0.2 + 0.4 * r + 0.2 * c
    for _ in range(6):
        cy, cx, width, amp = torch.rand(4, generator=gen, dtype=torch.float64)
        bumps = bumps + (amp - 0.5) * 0.6 * torch.exp(-((r - cy) ** 2 + (c - cx) ** 2) / (2 * (0.05 + 0.15 * width) ** 2))
    bumps = torch.stack([bumps, 0.9 * bumps + 0.05, 0.8 * bumps + 0.1])

    field = torch.rand(1, 3, size, size, generator=gen, dtype=torch.float64)
    field = fft_blur(field, gaussian_kernel(size - 1, 3.0).double())[0]
    field = 0.15 + 0.7 * (field - field.min()) / (field.max() - field.min())

    shapes = torch.full((3, size, size), 0.25, dtype=torch.float64)
    shapes[:, (r[:, 0] > 0.2) & (r[:, 0] < 0.6)] += 0.3
    disk = ((r - 0.65) ** 2 + (c - 0.6) ** 2) < 0.2**2
    for channel, value in enumerate((0.85, 0.6, 0.1)):
        shapes[channel][disk] = value
    shapes = fft_blur(shapes[None], gaussian_kernel(9, 1.6).double())[0]
    return torch.stack([bumps, field, shapes]).clamp(0, 1)


@pytest.mark.parametrize("sigma_8bit", [5, 10, 20])
def test_estimate_noise_sigma_on_smooth_images(sigma_8bit, record_property, capsys):
    images = smooth_test_images()
    sigma = sigma_8bit / 255
    estimates = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(100 * sigma_8bit + seed)
        noisy = images + sigma * torch.randn(images.shape, generator=gen, dtype=torch.float64)
        estimates.append(estimate_noise_sigma(noisy))
    estimates = torch.stack(estimates)  # (seeds, images)
    relative = (estimates - sigma) / sigma
    record_property(f"relative_errors_sigma{sigma_8bit}", relative.tolist())
    with capsys.disabled():
        print(f"\nnoise estimate sigma={sigma_8bit}/255: relative errors (seed x image) {np.round(relative.numpy(), 3).tolist()}")
    assert relative.abs().max() < 0.15
    assert relative.abs().mean() < 0.06


def test_estimate_noise_sigma_per_image_in_a_batch(device, dtype):
    images = smooth_test_images(48).to(device, dtype)[:2]
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(images.shape, generator=gen, dtype=dtype).to(device)
    levels = torch.tensor([3 / 255, 25 / 255], dtype=dtype, device=device).view(2, 1, 1, 1)
    estimates = estimate_noise_sigma(images + levels * noise)
    assert estimates.shape == (2,) and estimates.dtype == dtype and estimates.device.type == device.type
    torch.testing.assert_close(estimates, levels.flatten(), rtol=0.15, atol=0)
    # each image is estimated on its own
    torch.testing.assert_close(estimates[1:], estimate_noise_sigma((images + levels * noise)[1:]))


def test_estimate_noise_sigma_equals_numpy_haar_median():
    """Exactly the median of |(a − b − c + d)/2| over the 2×2 blocks (lower median), divided by 0.6745."""
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 11, 14, generator=gen, dtype=torch.float64)  # odd height: last row ignored
    out = estimate_noise_sigma(image)
    for b in range(2):
        x = image[b, :, :10, :14].numpy()
        blocks = x.reshape(3, 5, 2, 7, 2)
        hh = (blocks[:, :, 0, :, 0] - blocks[:, :, 0, :, 1] - blocks[:, :, 1, :, 0] + blocks[:, :, 1, :, 1]) / 2
        values = np.sort(np.abs(hh).ravel())
        expected = values[(values.size - 1) // 2] / 0.6745
        np.testing.assert_allclose(out[b].item(), expected, rtol=1e-12)


def test_estimate_noise_sigma_identities(dtype):
    gen = torch.Generator().manual_seed(5)
    image = smooth_test_images(32).to(dtype) + 0.03 * torch.randn(3, 3, 32, 32, generator=gen, dtype=dtype)
    base = estimate_noise_sigma(image)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(estimate_noise_sigma(image + 0.37), base, **tol)  # offset invariant
    torch.testing.assert_close(estimate_noise_sigma(2.5 * image), 2.5 * base, **tol)  # scale equivariant
    torch.testing.assert_close(estimate_noise_sigma(-image), base, **tol)  # sign invariant
    # the diagonal Haar band of a plane / of row-only or column-only variation is exactly zero
    r = torch.arange(16, dtype=dtype)[:, None]
    c = torch.arange(16, dtype=dtype)[None]
    plane = (0.01 * r + 0.02 * c).expand(1, 3, 16, 16)
    separable = (torch.sin(r) + torch.cos(c)).expand(1, 1, 16, 16)
    assert estimate_noise_sigma(plane).abs().max() < 1e-6
    assert estimate_noise_sigma(separable).abs().max() < 1e-6


def test_estimate_noise_sigma_of_pure_noise_and_other_dtypes():
    gen = torch.Generator().manual_seed(6)
    noise = 0.1 * torch.randn(1, 3, 64, 64, generator=gen)
    torch.testing.assert_close(estimate_noise_sigma(noise), torch.tensor([0.1]), rtol=0.05, atol=0)
    # half precision and 8-bit integer images are computed in float32
    assert estimate_noise_sigma(noise.half()).dtype == torch.float32
    torch.testing.assert_close(estimate_noise_sigma(noise.half()), estimate_noise_sigma(noise), rtol=0.01, atol=0)
    levels = (128 + 255 * noise).round().clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(estimate_noise_sigma(levels) / 255, torch.tensor([0.1]), rtol=0.06, atol=0)


def test_estimate_noise_sigma_errors():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        estimate_noise_sigma(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="at least 2x2"):
        estimate_noise_sigma(torch.rand(1, 1, 1, 8))
