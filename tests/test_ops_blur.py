"""Blur operators checked against explicit loops, numpy and F.conv2d, plus adjoint and gradient identities."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_blind.ops import crop_kernel, fft_blur, fft_blur_adjoint, o2p, p2o, pad_kernel, spatial_blur


def circular_convolution_reference(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """True circular convolution with the kernel centre at ``(kh//2, kw//2)``, by a sum of shifted copies.

    ``y[i, j] = Σ_{m,n} k[m, n] · x[(i − (m − kh//2)) mod H, (j − (n − kw//2)) mod W]``.
    ``image`` is ``(..., H, W)`` and ``kernel`` ``(..., kh, kw)`` broadcastable against it.
    """
    kh, kw = kernel.shape[-2:]
    out = np.zeros(np.broadcast_shapes(image.shape[:-2], kernel.shape[:-2]) + image.shape[-2:])
    for m in range(kh):
        for n in range(kw):
            shifted = np.roll(image, shift=(m - kh // 2, n - kw // 2), axis=(-2, -1))  # shifted[i] = x[i - s]
            out = out + kernel[..., m, n][..., None, None] * shifted
    return out


def correlation_reference(image: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """``"same"`` cross-correlation of one 2-D image with a 2-D kernel, padding (k−1)//2 before and k//2 after."""
    kh, kw = kernel.shape
    h, w = image.shape
    padded = np.pad(image, (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)), mode=mode)
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = (padded[i : i + kh, j : j + kw] * kernel).sum()
    return out


KERNEL_SIZES = [(3, 3), (5, 5), (4, 4), (6, 6), (3, 4), (4, 5), (1, 1)]


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES, ids=lambda s: f"k{s[0]}x{s[1]}")
def test_fft_blur_matches_direct_circular_convolution(kernel_size, device, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 11, 14, generator=gen, dtype=torch.float64)
    kernel = torch.rand(2, 1, *kernel_size, generator=gen, dtype=torch.float64)
    kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
    expected = circular_convolution_reference(image.numpy(), kernel.numpy())

    out = fft_blur(image.to(device, dtype), kernel.to(device, dtype))
    assert out.shape == image.shape and out.dtype == dtype and out.device.type == device.type
    torch.testing.assert_close(out.cpu(), torch.from_numpy(expected).to(dtype), **tol)


@pytest.mark.parametrize("kernel_size", [5, 6])
def test_fft_blur_broadcast_kernel_equals_per_sample_kernel(kernel_size, device, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(3, 2, 12, 9, generator=gen, dtype=dtype).to(device)
    kernel = torch.rand(1, 1, kernel_size, kernel_size, generator=gen, dtype=dtype).to(device)
    broadcast = fft_blur(image, kernel)
    batched = fft_blur(image, kernel.expand(3, 1, kernel_size, kernel_size))
    torch.testing.assert_close(broadcast, batched, **tol)
    expected = circular_convolution_reference(image.double().cpu().numpy(), kernel.double().cpu().numpy())
    torch.testing.assert_close(broadcast.cpu(), torch.from_numpy(expected).to(dtype), **tol)


def test_fft_blur_batched_kernels_are_applied_per_sample(device):
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 1, 10, 10, generator=gen, dtype=torch.float64).to(device)
    kernels = torch.rand(2, 1, 3, 3, generator=gen, dtype=torch.float64).to(device)
    out = fft_blur(image, kernels)
    for b in range(2):
        torch.testing.assert_close(out[b : b + 1], fft_blur(image[b : b + 1], kernels[b : b + 1]))
    assert not torch.allclose(out[0], fft_blur(image[:1], kernels[1:2])[0])


@pytest.mark.parametrize("kernel_size", [3, 4, 7, 8])
def test_dirac_kernel_is_identity_and_impulse_response_is_the_kernel(kernel_size, device):
    k = kernel_size
    dirac = torch.zeros(1, 1, k, k, dtype=torch.float64, device=device)
    dirac[..., k // 2, k // 2] = 1
    image = torch.rand(1, 2, 12, 13, dtype=torch.float64, device=device)
    torch.testing.assert_close(fft_blur(image, dirac), image)

    kernel = torch.rand(1, 1, k, k, dtype=torch.float64, device=device)
    impulse = torch.zeros(1, 1, 16, 16, dtype=torch.float64, device=device)
    impulse[..., 8, 8] = 1
    response = fft_blur(impulse, kernel)
    # The centre k//2 of the kernel lands on the impulse position.
    torch.testing.assert_close(response[0, 0, 8 - k // 2 : 8 - k // 2 + k, 8 - k // 2 : 8 - k // 2 + k], kernel[0, 0])
    torch.testing.assert_close(response.sum(), kernel.sum())


@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 4), (5, 2), (8, 7)])
def test_pad_kernel_crop_kernel_and_p2o_o2p_round_trip(kernel_size, device, dtype, tol):
    kh, kw = kernel_size
    kernel = torch.rand(2, 1, kh, kw, dtype=dtype, device=device)
    padded = pad_kernel(kernel, (10, 12))
    assert padded.shape == (2, 1, 10, 12)
    # the kernel centre is moved to the origin, and nothing else is created or lost
    torch.testing.assert_close(padded[..., 0, 0], kernel[..., kh // 2, kw // 2])
    torch.testing.assert_close(padded.sum(dim=(-2, -1)), kernel.sum(dim=(-2, -1)), **tol)
    assert (padded != 0).sum() == (kernel != 0).sum()
    torch.testing.assert_close(crop_kernel(padded, (kh, kw)), kernel)
    if kh == kw:
        torch.testing.assert_close(crop_kernel(padded, kh), kernel)

    otf = p2o(kernel, (10, 12))
    assert otf.is_complex() and otf.shape == (2, 1, 10, 12)
    # The OTF at frequency 0 is the kernel sum; the round trip restores the kernel.
    torch.testing.assert_close(otf[..., 0, 0].real, kernel.sum(dim=(-2, -1)), **tol)
    torch.testing.assert_close(o2p(otf, (kh, kw)), kernel, **tol)


def test_p2o_matches_numpy_dft_of_the_rolled_kernel():
    kernel = np.random.default_rng(3).random((5, 4))
    canvas = np.zeros((9, 11))
    canvas[:5, :4] = kernel
    canvas = np.roll(canvas, shift=(-2, -2), axis=(0, 1))
    expected = np.fft.fft2(canvas)
    otf = p2o(torch.from_numpy(kernel)[None, None], (9, 11))[0, 0]
    np.testing.assert_allclose(otf.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("kernel_size", [3, 4, 5, 6])
def test_fft_blur_adjoint_identity(kernel_size, device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 12, generator=gen, dtype=torch.float64).to(device)
    y = torch.randn(2, 3, 9, 12, generator=gen, dtype=torch.float64).to(device)
    kernel = torch.rand(2, 1, kernel_size, kernel_size, generator=gen, dtype=torch.float64).to(device)
    lhs = (fft_blur(x, kernel) * y).sum()
    rhs = (x * fft_blur_adjoint(y, kernel)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)
    # the adjoint is a convolution with the 180°-rotated kernel (about the centre (k//2, k//2))
    if kernel_size % 2 == 1:
        torch.testing.assert_close(fft_blur_adjoint(y, kernel), fft_blur(y, kernel.flip(-2, -1)))


@pytest.mark.parametrize("kernel_size", [3, 4, 5, 6, 8])
def test_spatial_blur_zeros_equals_conv2d_same_per_channel(kernel_size, device, dtype, tol):
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(2, 3, 13, 16, generator=gen, dtype=dtype).to(device)
    kernel = torch.rand(2, 1, kernel_size, kernel_size, generator=gen, dtype=dtype).to(device)
    out = spatial_blur(image, kernel, padding="zeros")
    assert out.shape == image.shape and out.dtype == dtype
    for b in range(2):
        for c in range(3):
            with warnings.catch_warnings():  # PyTorch warns that even sizes need an internal padded copy
                warnings.simplefilter("ignore", UserWarning)
                expected = F.conv2d(image[b : b + 1, c : c + 1], kernel[b : b + 1], padding="same")
            torch.testing.assert_close(out[b : b + 1, c : c + 1], expected, **tol)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("kernel_size", [(3, 3), (6, 6), (4, 5)])
def test_spatial_blur_matches_numpy_padded_correlation(mode, kernel_size):
    gen = torch.Generator().manual_seed(6)
    image = torch.rand(1, 2, 10, 12, generator=gen, dtype=torch.float64)
    kernel = torch.rand(1, 1, *kernel_size, generator=gen, dtype=torch.float64)
    np_mode = {"zeros": "constant", "reflect": "reflect", "circular": "wrap"}[mode]
    out = spatial_blur(image, kernel, padding=mode)
    for c in range(2):
        expected = correlation_reference(image[0, c].numpy(), kernel[0, 0].numpy(), np_mode)
        np.testing.assert_allclose(out[0, c].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("kernel_size", [3, 5, 6, 8])
def test_spatial_blur_is_fft_blur_of_flipped_kernel(kernel_size, device, dtype, tol):
    k = kernel_size
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, 24, 20, generator=gen, dtype=dtype).to(device)
    kernel = torch.rand(2, 1, k, k, generator=gen, dtype=dtype).to(device)
    via_fft = fft_blur(image, kernel.flip(-2, -1))
    zeros = spatial_blur(image, kernel, padding="zeros")
    # in the interior (no padded pixel involved) zero padding and circular padding agree
    torch.testing.assert_close(zeros[..., k : -k, k : -k], via_fft[..., k : -k, k : -k], **tol)
    assert not torch.allclose(zeros[..., 0, :], via_fft[..., 0, :], **tol)  # but not at the border
    # with circular padding they agree everywhere
    torch.testing.assert_close(spatial_blur(image, kernel, padding="circular"), via_fft, **tol)


def test_blur_errors():
    image = torch.rand(1, 3, 8, 10)
    kernel = torch.rand(1, 1, 3, 3)
    with pytest.raises(ValueError, match="larger than the image"):
        fft_blur(image, torch.rand(1, 1, 9, 9))
    with pytest.raises(ValueError, match="larger than the image"):
        fft_blur(image, torch.rand(1, 1, 3, 11))
    with pytest.raises(ValueError, match="larger than the image"):
        spatial_blur(image, torch.rand(1, 1, 9, 9))
    with pytest.raises(ValueError, match="larger than the image"):
        fft_blur_adjoint(image, torch.rand(1, 1, 9, 3))
    with pytest.raises(ValueError, match="larger than the image"):
        pad_kernel(torch.rand(1, 1, 9, 9), (8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fft_blur(image[0], kernel)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        spatial_blur(image[0], kernel)
    with pytest.raises(ValueError, match="kernel must be"):
        fft_blur(image, kernel[0])
    with pytest.raises(ValueError, match="kernel must be"):
        fft_blur(image, torch.rand(1, 3, 3, 3))
    with pytest.raises(ValueError, match="kernel batch"):
        fft_blur(torch.rand(2, 3, 8, 8), torch.rand(3, 1, 3, 3))
    with pytest.raises(ValueError, match="kernel batch"):
        spatial_blur(torch.rand(2, 3, 8, 8), torch.rand(3, 1, 3, 3))
    with pytest.raises(ValueError, match="padding"):
        spatial_blur(image, kernel, padding="replicate")


def test_blur_of_mixed_dtypes_follows_the_image():
    image = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    kernel = torch.rand(1, 1, 3, 3, dtype=torch.float32)
    assert fft_blur(image, kernel).dtype == torch.float64
    assert spatial_blur(image, kernel).dtype == torch.float64
    torch.testing.assert_close(fft_blur(image, kernel), fft_blur(image, kernel.double()))


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_blur_gradcheck(kernel_size):
    gen = torch.Generator().manual_seed(8)
    image = torch.rand(1, 1, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    kernel = torch.rand(1, 1, kernel_size, kernel_size, generator=gen, dtype=torch.float64, requires_grad=True)
    for fn in (fft_blur, fft_blur_adjoint, lambda x, k: spatial_blur(x, k, "zeros"), lambda x, k: spatial_blur(x, k, "reflect")):
        assert torch.autograd.gradcheck(fn, (image, kernel), fast_mode=True)


def test_fft_blur_gradient_is_the_adjoint(device):
    """∇_x ⟨y, k ⊛ x⟩ = kᵀ y: the autograd gradient equals the explicit adjoint."""
    image = torch.rand(2, 3, 9, 10, dtype=torch.float64, device=device, requires_grad=True)
    weights = torch.randn(2, 3, 9, 10, dtype=torch.float64, device=device)
    kernel = torch.rand(2, 1, 4, 4, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad((fft_blur(image, kernel) * weights).sum(), image)
    torch.testing.assert_close(grad, fft_blur_adjoint(weights, kernel))


def test_edge_taper_window_shape_values_and_errors():
    from diffusers_blind.ops import edge_taper_window

    window = edge_taper_window((20, 30), 5)
    assert window.shape == (1, 1, 20, 30)
    assert torch.all(window[..., 5:15, 5:25] == 1)
    assert 0 < window[0, 0, 0, 15] < window[0, 0, 2, 15] < window[0, 0, 4, 15] < 1
    torch.testing.assert_close(window, window.flip(-1))
    torch.testing.assert_close(window, window.flip(-2))
    assert torch.all(edge_taper_window((8, 8), 0) == 1)
    with pytest.raises(ValueError, match="taper width"):
        edge_taper_window((8, 8), 5)


def test_edge_taper_removes_border_bias_of_fourier_kernel_estimate():
    """A kernel estimated in Fourier from a non-circularly blurred pair is much better with the taper."""
    from diffusers_blind import KernelEstimator
    from diffusers_blind.metrics import mnc
    from diffusers_blind.ops import edge_taper_window, motion_kernel

    g = torch.Generator().manual_seed(0)
    sharp = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=(64, 64), mode="bicubic")
    sharp = sharp.clamp(0, 1) + 0.05 * torch.rand(1, 3, 64, 64, generator=g)
    kernel = motion_kernel(9, 0.6, 3)
    blurry = spatial_blur(sharp, kernel.flip(-2, -1), padding="reflect")  # true convolution, reflect borders
    estimator = KernelEstimator(kernel_size=9, regularization="none", num_iterations=30)
    window = edge_taper_window((64, 64), 9)
    plain = mnc(estimator(blurry, sharp, 0.01), kernel).item()
    tapered = mnc(estimator(window * blurry, window * sharp, 0.01), kernel).item()
    assert tapered > plain + 0.02 and tapered > 0.9


def test_photograph_window_is_zero_on_the_margin_and_ramps_inside():
    from diffusers_blind.ops import edge_taper_window, photograph_window

    window = photograph_window((40, 50), (5, 6, 30, 36), kernel_size=9)
    assert window.shape == (1, 1, 40, 50)
    assert window[..., :5, :].abs().max() == 0 and window[..., :, :6].abs().max() == 0
    assert window[..., 20, 24] == 1
    torch.testing.assert_close(window, edge_taper_window((40, 50), 4, region=(5, 6, 30, 36)))
    # the ramp never exceeds a quarter of the photograph
    torch.testing.assert_close(photograph_window((20, 20), (2, 2, 16, 16), 33), edge_taper_window((20, 20), 4, region=(2, 2, 16, 16)))


def test_valid_mask_keeps_exactly_the_pixels_the_kernel_sees_inside_the_region():
    from diffusers_blind.ops import valid_mask

    mask = valid_mask((40, 50), (5, 6, 30, 36), kernel_size=9)
    rows, cols = mask[0, 0].nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (9, 30, 10, 37)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    # a blur of anything outside the region cannot reach the kept pixels
    inside = torch.zeros(1, 1, 40, 50)
    inside[..., 5:35, 6:42] = 1
    kernel = torch.ones(1, 1, 9, 9) / 81
    reach = fft_blur(1 - inside, kernel)
    assert (reach * mask).abs().max() < 1e-6
    with pytest.raises(ValueError, match="neighbourhood"):
        valid_mask((40, 50), (5, 6, 8, 36), kernel_size=9)
