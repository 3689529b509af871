"""Kernel projection, recentring, shifting and the seeded kernel generators."""

import math

import numpy as np
import pytest
import torch

from diffusers_blind.ops import (
    GaussianKernelGenerator,
    MotionKernelGenerator,
    as_numpy_generator,
    center_kernel,
    dirac_kernel,
    fft_blur,
    gaussian_kernel,
    kernel_center_of_mass,
    motion_kernel,
    project_kernel,
    random_gaussian_kernel,
    shift_kernel,
)


def numpy_center_of_mass(kernel: np.ndarray) -> np.ndarray:
    """(row, col) centre of mass of a 2-D non-negative array, computed with numpy."""
    rows, cols = np.indices(kernel.shape)
    return np.array([(rows * kernel).sum(), (cols * kernel).sum()]) / kernel.sum()


def off_centre_gaussian(size: int, mean: tuple[float, float], std: tuple[float, float], dtype=torch.float64):
    """A sampled Gaussian with its mean at an arbitrary (fractional) position, normalised to sum 1."""
    r = torch.arange(size, dtype=torch.float64)[:, None]
    c = torch.arange(size, dtype=torch.float64)[None, :]
    g = torch.exp(-0.5 * (((r - mean[0]) / std[0]) ** 2 + ((c - mean[1]) / std[1]) ** 2))
    return (g / g.sum()).to(dtype)[None, None]


# ---------------------------------------------------------------- dirac / projection
@pytest.mark.parametrize("size", [1, 4, 5])
def test_dirac_kernel(size, device, dtype):
    k = dirac_kernel(size, batch_size=3, device=device, dtype=dtype)
    assert k.shape == (3, 1, size, size) and k.dtype == dtype and k.device.type == device.type
    assert k.sum().item() == 3 and (k[..., size // 2, size // 2] == 1).all()
    image = torch.rand(3, 2, 8, 9, dtype=dtype, device=device)
    torch.testing.assert_close(fft_blur(image, k), image)  # identity blur


def test_project_kernel_clips_and_normalises(device, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(4, 1, 5, 6, generator=gen, dtype=dtype)
    out = project_kernel(raw.to(device)).cpu()
    expected = np.clip(raw.double().numpy(), 0, None)
    expected = expected / expected.sum(axis=(-2, -1), keepdims=True)
    assert out.shape == raw.shape and out.dtype == dtype
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=(-2, -1)), torch.ones(4, 1, dtype=dtype), **tol)
    torch.testing.assert_close(out, torch.from_numpy(expected).to(dtype), **tol)
    # projecting twice changes nothing
    torch.testing.assert_close(project_kernel(out), out, **tol)


@pytest.mark.parametrize("shape", [(5, 5), (4, 4), (3, 6)])
def test_project_kernel_all_zero_or_negative_becomes_dirac(shape, device):
    kh, kw = shape
    kernels = torch.rand(3, 1, kh, kw, device=device)
    kernels[0] = 0
    kernels[2] = -kernels[2]
    out = project_kernel(kernels)
    dirac = torch.zeros(kh, kw, device=device)
    dirac[kh // 2, kw // 2] = 1
    torch.testing.assert_close(out[0, 0], dirac)
    torch.testing.assert_close(out[2, 0], dirac)
    torch.testing.assert_close(out[1], kernels[1] / kernels[1].sum())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_project_kernel_refuses_non_finite_kernels(bad):
    """A NaN kernel used to become a Dirac silently (its NaN sum fails ``total > 0``)."""
    kernels = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    kernels[1, 0, 1, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        project_kernel(kernels)
    # the sync-free recentring lets the NaN through instead of hiding it behind a Dirac
    centred = center_kernel(kernels)
    assert torch.isnan(centred[1]).all() and torch.isfinite(centred[0]).all()


def test_dirac_kernel_and_generators_refuse_empty_sizes():
    from diffusers_blind.ops import ShakeKernelGenerator

    for size in (0, -1, 2.5):
        with pytest.raises(ValueError, match="kernel_size"):
            dirac_kernel(size)
    with pytest.raises(ValueError, match="batch_size"):
        dirac_kernel(5, batch_size=0)
    for generator in (MotionKernelGenerator(9), GaussianKernelGenerator(9), ShakeKernelGenerator(9)):
        with pytest.raises(ValueError, match="batch_size"):
            generator(0, generator=0)
        assert generator(2.0, generator=0).shape == (2, 1, 9, 9)  # an integral float is a count


def test_project_kernel_keeps_the_shape_of_unbatched_kernels():
    out = project_kernel(torch.zeros(4, 5))
    assert out.shape == (4, 5) and out[2, 2] == 1 and out.sum() == 1
    torch.testing.assert_close(project_kernel(torch.full((2, 3), 2.0)), torch.full((2, 3), 1 / 6))


# ---------------------------------------------------------------- centre of mass / shift / centre
def test_kernel_center_of_mass_matches_numpy(device, dtype):
    kernels = torch.rand(3, 1, 7, 10, dtype=dtype)
    com = kernel_center_of_mass(kernels.to(device)).cpu()
    assert com.shape == (3, 2)
    for b in range(3):
        np.testing.assert_allclose(com[b].double().numpy(), numpy_center_of_mass(kernels[b, 0].double().numpy()), rtol=1e-5)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_shift_kernel_by_integers_equals_roll(mode, device, dtype):
    kernels = torch.zeros(2, 1, 15, 14, dtype=dtype, device=device)
    kernels[:, :, 5:10, 4:9] = torch.rand(2, 1, 5, 5, dtype=dtype, device=device)  # away from the border
    shifts = torch.tensor([[2.0, -3.0], [-4.0, 1.0]], dtype=dtype, device=device)
    out = shift_kernel(kernels, shifts, mode=mode)
    for b, (dr, dc) in enumerate([(2, -3), (-4, 1)]):
        torch.testing.assert_close(out[b], torch.roll(kernels[b], shifts=(dr, dc), dims=(-2, -1)), atol=1e-5, rtol=1e-5)


def test_shift_kernel_fractional_bilinear_moves_the_centre_of_mass_exactly(device):
    kernel = off_centre_gaussian(25, (12.0, 12.0), (1.5, 2.0)).to(device)
    shift = torch.tensor([[0.3, -1.7]], dtype=torch.float64, device=device)
    out = shift_kernel(kernel, shift, mode="bilinear")
    torch.testing.assert_close(kernel_center_of_mass(out), kernel_center_of_mass(kernel) + shift, atol=1e-6, rtol=0)


def test_shift_kernel_zero_outside_the_support():
    kernel = torch.zeros(1, 1, 5, 5)
    kernel[..., 2, 4] = 1
    out = shift_kernel(kernel, torch.tensor([[0.0, 2.0]]), mode="bilinear")
    assert out.abs().max() < 1e-6  # the mass left the support instead of wrapping around


@pytest.mark.parametrize("size", [15, 16, 33])
@pytest.mark.parametrize("offset", [(1.3, -0.7), (-2.4, 1.9), (0.25, 0.1)])
def test_center_kernel_moves_centre_of_mass_to_k_half(size, offset, device, dtype):
    mean = (size // 2 + offset[0], size // 2 + offset[1])
    kernel = off_centre_gaussian(size, mean, (1.5, 2.0), dtype=dtype).to(device)
    out = center_kernel(kernel)
    assert out.dtype == dtype and out.device.type == device.type and out.shape == kernel.shape
    com = numpy_center_of_mass(out[0, 0].double().cpu().numpy())
    np.testing.assert_allclose(com, [size // 2, size // 2], atol=2e-3)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum().double(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)
    # shape is preserved: the centred kernel is (up to interpolation) the Gaussian centred at k//2
    torch.testing.assert_close(
        out, off_centre_gaussian(size, (size // 2, size // 2), (1.5, 2.0), dtype=dtype).to(device), atol=2e-3, rtol=0
    )


@pytest.mark.parametrize("size", [9, 10])
def test_center_kernel_small_odd_and_even_sizes(size, device):
    kernel = off_centre_gaussian(size, (size // 2 + 0.6, size // 2 - 0.8), (1.0, 1.2)).to(device)
    com = numpy_center_of_mass(center_kernel(kernel)[0, 0].cpu().numpy())
    np.testing.assert_allclose(com, [size // 2, size // 2], atol=0.05)


@pytest.mark.parametrize("size", [15, 16])
def test_center_kernel_keeps_a_centred_kernel(size, device, dtype):
    kernel = off_centre_gaussian(size, (size // 2, size // 2), (1.5, 2.5), dtype=dtype)
    if size % 2 == 0:  # zero the first row/column so that the support is symmetric about k//2
        kernel[..., 0, :] = 0
        kernel[..., :, 0] = 0
        kernel = kernel / kernel.sum()
    kernel = kernel.to(device)
    np.testing.assert_allclose(numpy_center_of_mass(kernel[0, 0].cpu().numpy()), [size // 2, size // 2], atol=1e-6)
    torch.testing.assert_close(center_kernel(kernel), kernel, atol=5e-5, rtol=0)
    torch.testing.assert_close(center_kernel(kernel, mode="bilinear"), kernel, atol=5e-5, rtol=0)


def test_center_kernel_batched_and_stays_in_torch(monkeypatch, device):
    kernels = torch.cat(
        [off_centre_gaussian(15, (9.2, 5.5), (1.2, 1.8)), off_centre_gaussian(15, (6.0, 7.4), (2.0, 1.0))]
    ).float().to(device)

    def forbidden(*args, **kwargs):
        raise AssertionError("center_kernel left torch (host round trip)")

    for name in ("numpy", "item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = center_kernel(kernels)
    monkeypatch.undo()
    assert out.dtype == torch.float32 and out.device.type == device.type
    for b in range(2):
        np.testing.assert_allclose(numpy_center_of_mass(out[b, 0].cpu().numpy()), [7, 7], atol=2e-3)
        # each kernel is centred on its own: same result as centring it alone
        torch.testing.assert_close(out[b : b + 1], center_kernel(kernels[b : b + 1]))


def test_center_kernel_of_zero_kernel_is_dirac():
    out = center_kernel(torch.zeros(1, 1, 6, 6))
    torch.testing.assert_close(out, dirac_kernel(6))


# ---------------------------------------------------------------- Gaussian kernels
@pytest.mark.parametrize("std", [1.0, 1.5, (1.2, 2.5)])
@pytest.mark.parametrize("angle", [0.0, 0.6])
def test_gaussian_kernel_moments(std, angle):
    size = 31
    kernel = gaussian_kernel(size, std, angle=angle)
    assert kernel.shape == (1, 1, size, size) and kernel.dtype == torch.float32
    k = kernel[0, 0].double().numpy()
    assert (k >= 0).all() and k[size // 2, size // 2] == k.max()
    np.testing.assert_allclose(k.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(numpy_center_of_mass(k), [size // 2, size // 2], atol=1e-5)
    rows, cols = np.indices(k.shape) - size // 2
    cov = np.array(
        [[(k * rows * rows).sum(), (k * rows * cols).sum()], [(k * rows * cols).sum(), (k * cols * cols).sum()]]
    )
    std_r, std_c = (std, std) if isinstance(std, float) else std
    # (u, v) = M (r, c) has independent coordinates with variances std_r², std_c²  ⇒  Cov(r, c) = Mᵀ D M
    m = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    expected = m.T @ np.diag([std_r**2, std_c**2]) @ m
    np.testing.assert_allclose(cov, expected, atol=1e-4)


def test_gaussian_kernel_errors():
    with pytest.raises(ValueError):
        gaussian_kernel(9, 0.0)
    with pytest.raises(ValueError):
        gaussian_kernel(9, (1.0, -1.0))
    # these used to return an empty or all-NaN kernel, or fail with an unrelated torch error
    for size in (0, -3, 3.5, float("nan"), True):
        with pytest.raises(ValueError, match="kernel_size"):
            gaussian_kernel(size, 1.0)
    for std in (float("nan"), float("inf"), (1.0, float("nan")), "wide"):
        with pytest.raises(ValueError, match="std"):
            gaussian_kernel(5, std)
    with pytest.raises(ValueError, match="angle"):
        gaussian_kernel(5, 1.0, angle=float("nan"))
    torch.testing.assert_close(gaussian_kernel(5.0, 1.0), gaussian_kernel(5, 1.0))
    torch.testing.assert_close(gaussian_kernel(5, np.float32(1.0)), gaussian_kernel(5, 1.0))


def test_random_gaussian_kernel_and_generator():
    a = random_gaussian_kernel(15, (0.8, 3.0), generator=3)
    torch.testing.assert_close(a, random_gaussian_kernel(15, (0.8, 3.0), generator=3))
    assert not torch.allclose(a, random_gaussian_kernel(15, (0.8, 3.0), generator=4))
    batch = GaussianKernelGenerator(12, (0.5, 2.0))(batch_size=3, generator=0)
    assert batch.shape == (3, 1, 12, 12)
    torch.testing.assert_close(batch.sum(dim=(-2, -1)), torch.ones(3, 1))
    torch.testing.assert_close(batch, GaussianKernelGenerator(12, (0.5, 2.0))(batch_size=3, generator=0))
    assert not torch.allclose(batch[0], batch[1])


# ---------------------------------------------------------------- generators / motion kernels
def test_as_numpy_generator():
    rng = np.random.default_rng(0)
    assert as_numpy_generator(rng) is rng
    assert as_numpy_generator(5).uniform() == np.random.default_rng(5).uniform()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert as_numpy_generator(g1).uniform() == as_numpy_generator(g2).uniform()
    # the torch generator is advanced: the next numpy generator differs
    assert as_numpy_generator(g1).uniform() != as_numpy_generator(torch.Generator().manual_seed(7)).uniform()
    assert isinstance(as_numpy_generator(None), np.random.Generator)


@pytest.mark.parametrize("size", [9, 10, 33, 64])
def test_motion_kernel_properties(size):
    for seed in range(3):
        kernel = motion_kernel(size, 0.5, generator=seed)
        assert kernel.shape == (1, 1, size, size) and kernel.dtype == torch.float32
        assert torch.isfinite(kernel).all() and (kernel >= 0).all()
        torch.testing.assert_close(kernel.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
        com = numpy_center_of_mass(kernel[0, 0].double().numpy())
        np.testing.assert_allclose(com, [size // 2, size // 2], atol=0.05)
        assert kernel.max() < 0.9  # a blur, not a Dirac


def test_motion_kernel_reproducible_for_the_same_seed():
    a = motion_kernel(21, 0.6, generator=11)
    torch.testing.assert_close(a, motion_kernel(21, 0.6, generator=11), atol=0, rtol=0)
    torch.testing.assert_close(a, motion_kernel(21, 0.6, generator=np.random.default_rng(11)), atol=0, rtol=0)
    t = motion_kernel(21, 0.6, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(t, motion_kernel(21, 0.6, generator=torch.Generator().manual_seed(11)), atol=0, rtol=0)
    # different seeds give different kernels
    others = [motion_kernel(21, 0.6, generator=s) for s in (12, 13)]
    others.append(motion_kernel(21, 0.6, generator=torch.Generator().manual_seed(12)))
    for other in others:
        assert (other - a).abs().max() > 1e-3
    # successive draws from one generator differ
    gen = torch.Generator().manual_seed(11)
    assert (motion_kernel(21, 0.6, generator=gen) - motion_kernel(21, 0.6, generator=gen)).abs().max() > 1e-3


@pytest.mark.parametrize("intensity", [0.0, 1.0])
def test_motion_kernel_intensity_bounds_are_valid(intensity):
    kernel = motion_kernel(15, intensity, generator=0)
    torch.testing.assert_close(kernel.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (kernel >= 0).all()


@pytest.mark.parametrize("intensity", [-0.1, 1.5])
def test_motion_kernel_bad_intensity(intensity):
    with pytest.raises(ValueError, match="intensity"):
        motion_kernel(15, intensity, generator=0)


def test_motion_kernel_bad_size():
    with pytest.raises(ValueError, match="kernel_size"):
        motion_kernel(2, 0.5, generator=0)


def test_motion_kernel_generator_batches():
    gen = MotionKernelGenerator(kernel_size=17, intensity=0.5)
    batch = gen(batch_size=3, generator=1)
    assert batch.shape == (3, 1, 17, 17)
    torch.testing.assert_close(batch.sum(dim=(-2, -1)), torch.ones(3, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch, gen(batch_size=3, generator=1), atol=0, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-3
    ranged = MotionKernelGenerator(kernel_size=12, intensity=(0.2, 0.8))(batch_size=2, generator=torch.Generator().manual_seed(2))
    assert ranged.shape == (2, 1, 12, 12) and (ranged >= 0).all()


def test_rescale_kernel_halves_and_doubles_a_blur_and_keeps_it_centred():
    from diffusers_blind.metrics.kernel import mnc
    from diffusers_blind.ops import kernel_center_of_mass, rescale_kernel

    kernel = gaussian_kernel(33, (6.0, 2.0), angle=0.3)
    half = rescale_kernel(kernel, 0.5, 17)
    assert half.shape == (1, 1, 17, 17) and abs(float(half.sum()) - 1) < 1e-5 and float(half.min()) >= 0
    torch.testing.assert_close(kernel_center_of_mass(half), torch.tensor([[8.0, 8.0]]), atol=0.05, rtol=0)
    # second moments halve with the resolution: a Gaussian stays a Gaussian of half the std
    torch.testing.assert_close(half, gaussian_kernel(17, (3.0, 1.0), angle=0.3), atol=4e-3, rtol=0)
    back = rescale_kernel(half, 2.0, 33)
    assert float(mnc(back, kernel)) > 0.97
    with pytest.raises(ValueError, match="factor"):
        rescale_kernel(kernel, 0.0, 17)


def test_kernel_extent_measures_the_centred_support_above_a_level():
    from diffusers_blind.ops import kernel_extent

    kernel = torch.zeros(2, 1, 15, 15)
    kernel[0, 0, 7, 4:11] = 1.0  # a 7 px bar
    kernel[1, 0, 7, 7] = 1.0  # a Dirac
    kernel[1, 0, 7, 7 + 6] = 0.05  # a faint pixel far out: below 10 % of the peak
    kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
    assert kernel_extent(kernel).tolist() == [7, 1]
    assert kernel_extent(kernel, level=0.01).tolist() == [7, 13]
    # even sizes: a pixel in the first row or column used to give k + 1
    assert kernel_extent(gaussian_kernel(4, 1.0)).tolist() == [3]
    assert kernel_extent(torch.ones(1, 1, 6, 6)).tolist() == [5]
    assert kernel_extent(torch.ones(1, 1, 5, 5)).tolist() == [5]
    with pytest.raises(ValueError, match="level"):
        kernel_extent(kernel, level=0)


def test_shake_kernels_are_seeded_sum_one_kernels_whose_extent_follows_the_setting():
    from diffusers_blind.ops import ShakeKernelGenerator, kernel_extent, shake_kernel

    first = ShakeKernelGenerator(33, extent=(0.2, 0.8))(6, 0)
    again = ShakeKernelGenerator(33, extent=(0.2, 0.8))(6, 0)
    torch.testing.assert_close(first, again)  # reproducible under a seed
    assert first.shape == (6, 1, 33, 33) and (first >= 0).all()
    torch.testing.assert_close(first.sum(dim=(-2, -1)), torch.ones(6, 1))
    short = torch.cat([shake_kernel(33, 0.2, seed) for seed in range(6)])
    long = torch.cat([shake_kernel(33, 0.8, seed) for seed in range(6)])
    assert (kernel_extent(long, 0.05) > kernel_extent(short, 0.05)).all()
    # thin paths: far fewer than half of the pixels inside the long kernels' extent carry light
    assert ((long > 0.05 * long.amax(dim=(-2, -1), keepdim=True)).float().mean(dim=(-2, -1)) < 0.25).all()
    with pytest.raises(ValueError, match="extent"):
        shake_kernel(33, 1.5)
    with pytest.raises(ValueError, match="kernel_size"):
        shake_kernel(2, 0.5)


@pytest.mark.parametrize("extent", [0.8, 0.9, 1.0])
def test_long_shake_kernels_are_centred(extent):
    """The centring used to cut light at the border: centre of mass up to 2.97 px off at extent 1."""
    from diffusers_blind.ops import kernel_center_of_mass, shake_kernel

    kernels = torch.cat([shake_kernel(33, extent, seed) for seed in range(20)])
    assert (kernels >= 0).all()
    torch.testing.assert_close(kernels.sum(dim=(-2, -1)), torch.ones(20, 1))
    assert (kernel_center_of_mass(kernels) - 16).abs().max() < 0.05


def test_kernel_generators_take_numpy_scalar_settings():
    from diffusers_blind.ops import MotionKernelGenerator

    plain = MotionKernelGenerator(9, 0.5)(2, generator=0)
    numpy_scalar = MotionKernelGenerator(9, np.float32(0.5))(2, generator=0)  # was a TypeError
    torch.testing.assert_close(numpy_scalar, plain)
