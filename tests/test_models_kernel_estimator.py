"""KernelEstimator (HQS M-step): recovery of known kernels, an independent numpy HQS, particles and errors."""

import numpy as np
import pytest
import torch

from diffusers_blind.models import KernelDenoiser, KernelEstimator
from diffusers_blind.ops import dirac_kernel, fft_blur, gaussian_kernel, motion_kernel


def smooth_images(batch=1, channels=3, size=32, seed=0, dtype=torch.float64):
    """Random images lightly smoothed by a 5×5 Gaussian: smooth-ish yet with energy at every frequency."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, size, size, generator=gen, dtype=torch.float64)
    return fft_blur(x, gaussian_kernel(5, 0.8).double()).to(dtype)


def random_kernel(size, seed, batch=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    k = torch.rand(batch, 1, size, size, generator=gen, dtype=torch.float64)
    return (k / k.sum(dim=(-2, -1), keepdim=True)).to(dtype)


def numpy_hqs(measurement, estimates, sigma, kernel, beta, iterations, r=None, scale_by_n=False, joint=False,
              anchor=None, gamma=0.0):
    """Independent numpy implementation of the HQS data step (no prior), following docs/conventions.md, "M-step (kernel update)".

    Per image b and channel c on the full grid:
    ``Z = IFFT((Σ_i conj(X_i)·Y + α·FFT(p2o(z))) / (Σ_i |X_i|² + α [+ n·H·W·r²]))``, mean over channels,
    roll by k//2 and keep the top-left k×k, clip at 0 and divide by the sum. ``joint``: the sums over
    channels move inside the fraction (one solve for all channels). ``anchor``: ``+ μ·FFT(p2o(anchor))`` in the
    numerator and ``+ μ`` in the denominator of each solve, ``μ = gamma·σ²``.
    """
    y = measurement.numpy()
    x = estimates.numpy()
    batch, channels, height, width = y.shape
    n = x.shape[0] // batch
    size = kernel.shape[-1]
    out = []
    for b in range(batch):
        z = kernel[b if kernel.shape[0] > 1 else 0, 0].numpy()
        alpha = sigma[b] ** 2 * beta * (n if scale_by_n else 1)
        mu, a_hat = 0.0, 0.0
        if anchor is not None:
            mu = gamma * sigma[b] ** 2
            a_canvas = np.zeros((height, width))
            a_canvas[:size, :size] = anchor[b if anchor.shape[0] > 1 else 0, 0].numpy()
            a_hat = np.fft.fft2(np.roll(a_canvas, (-(size // 2), -(size // 2)), axis=(0, 1)))
        for _ in range(iterations):
            canvas = np.zeros((height, width))
            canvas[:size, :size] = z
            z_hat = np.fft.fft2(np.roll(canvas, (-(size // 2), -(size // 2)), axis=(0, 1)))
            solutions, numerators, denominators = [], [], []
            for c in range(channels):
                x_hats = [np.fft.fft2(x[b * n + i, c]) for i in range(n)]
                y_hat = np.fft.fft2(y[b, c])
                numerator = sum(np.conj(xh) * y_hat for xh in x_hats)
                denominator = sum(np.abs(xh) ** 2 for xh in x_hats)
                if r is not None:
                    denominator = denominator + n * height * width * r[b] ** 2
                numerators.append(numerator)
                denominators.append(denominator)
                solutions.append(np.fft.ifft2((numerator + mu * a_hat + alpha * z_hat) / (denominator + mu + alpha)).real)
            if joint:
                full = np.fft.ifft2((sum(numerators) + mu * a_hat + alpha * z_hat) / (sum(denominators) + mu + alpha)).real
            else:
                full = np.mean(solutions, axis=0)
            z = np.roll(full, (size // 2, size // 2), axis=(0, 1))[:size, :size]
            z = np.clip(z, 0, None)
            z = z / z.sum()
        out.append(z)
    return torch.from_numpy(np.stack(out))[:, None]


# ---------------------------------------------------------------- recovery of a known kernel
@pytest.mark.parametrize("regularization", ["none", "l2", "l1"])
@pytest.mark.parametrize("true_size, estimated_size", [(5, 5), (7, 7), (5, 7), (4, 6)])
def test_hqs_recovers_the_true_kernel_from_a_dirac(regularization, true_size, estimated_size, device):
    x = smooth_images(seed=1).to(device)
    k_true = random_kernel(true_size, seed=2)
    pad = estimated_size - true_size  # embed the true kernel so that both have the centre at index size//2
    k_big = torch.zeros(1, 1, estimated_size, estimated_size, dtype=torch.float64)
    offset = estimated_size // 2 - true_size // 2
    k_big[..., offset : offset + true_size, offset : offset + true_size] = k_true
    assert pad >= 0 and torch.isclose(k_big.sum(), torch.tensor(1.0, dtype=torch.float64))
    k_big = k_big.to(device)
    y = fft_blur(x, k_big)

    estimator = KernelEstimator(
        kernel_size=estimated_size, regularization=regularization, lambda_=1e-7 if regularization == "l1" else 1.0,
        beta=100.0, num_iterations=40,
    ).to(device)
    out = estimator(y, x, 0.01)  # α = σ²β = 0.01
    assert out.shape == (1, 1, estimated_size, estimated_size) and out.dtype == torch.float64
    mse = (out - k_big).square().mean().item()
    assert mse < 1e-10, mse
    # starting from the Dirac, a single iteration is not yet there: the iterations matter
    one = KernelEstimator(kernel_size=estimated_size, regularization="none", beta=1e5, num_iterations=1)(y, x, 0.01)
    assert (one - k_big).square().mean() > 1e-6


def test_hqs_recovers_a_sparse_motion_kernel_in_float32():
    x = smooth_images(seed=3, dtype=torch.float32)
    k_true = motion_kernel(7, 0.5, generator=5)
    k_true = torch.where(k_true > 0.02, k_true, 0.0)  # sparse: the non-negativity constraint is active
    k_true = k_true / k_true.sum()
    assert (k_true == 0).sum() > 10
    y = fft_blur(x, k_true)
    out = KernelEstimator(kernel_size=7, regularization="none", beta=100.0, num_iterations=40)(y, x, 0.01)
    assert out.dtype == torch.float32
    assert (out - k_true).square().mean() < 1e-9
    assert (out >= 0).all() and abs(out.sum().item() - 1) < 1e-5


def test_true_kernel_is_a_fixed_point_of_hqs():
    x = smooth_images(seed=4)
    k_true = random_kernel(5, seed=5)
    y = fft_blur(x, k_true)
    estimator = KernelEstimator(kernel_size=5, regularization="none", beta=1e5, num_iterations=3)
    torch.testing.assert_close(estimator(y, x, 10 / 255, kernel=k_true), k_true, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- independent implementation
# image sizes ≥ 2k−1 use the support-restricted data step, smaller ones the full-grid FFT step
CASES = [(16, 5, n, u, s) for n in (1, 2) for u in ("none", "pigdm") for s in (False, True)]
CASES += [(size, k, 2, "pigdm", False) for size, k in [(16, 6), (12, 7), (10, 6)]]
CASES += [(size, k, 3, "none", True) for size, k in [(16, 6), (12, 7), (10, 6)]]


@pytest.mark.parametrize("image_size, kernel_size, particles, uncertainty, scale_by_n", CASES)
def test_matches_independent_numpy_hqs(image_size, kernel_size, particles, uncertainty, scale_by_n):
    batch, s = 2, image_size
    gen = torch.Generator().manual_seed(60)
    y = smooth_images(batch, 3, s, seed=6) + 0.02 * torch.randn(batch, 3, s, s, generator=gen, dtype=torch.float64)
    estimates = smooth_images(batch * particles, 3, s, seed=7)
    warm = random_kernel(kernel_size, seed=8, batch=batch)
    sigma = torch.tensor([0.03, 0.08], dtype=torch.float64)
    r = torch.tensor([0.05, 0.2], dtype=torch.float64)
    estimator = KernelEstimator(
        kernel_size=kernel_size, regularization="none", beta=1e3, num_iterations=3,
        uncertainty=uncertainty, scale_alpha_by_particles=scale_by_n,
    )
    out = estimator(y, estimates, sigma, kernel=warm, r=r)
    expected = numpy_hqs(
        y, estimates, sigma.numpy(), warm, 1e3, 3, r=r.numpy() if uncertainty == "pigdm" else None, scale_by_n=scale_by_n
    )
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("image_size, channel_mode", [(16, "joint"), (16, "mean"), (10, "joint")])
def test_anchor_matches_independent_numpy_hqs(image_size, channel_mode):
    """``γσ²‖k − k_a‖²`` enters each Fourier solve (support-restricted at 16 px, full grid at 10 px)."""
    batch, s, k = 2, image_size, 5
    gen = torch.Generator().manual_seed(61)
    y = smooth_images(batch, 3, s, seed=9) + 0.02 * torch.randn(batch, 3, s, s, generator=gen, dtype=torch.float64)
    estimates = smooth_images(batch, 3, s, seed=10)
    warm, anchor = random_kernel(k, seed=11, batch=batch), random_kernel(k, seed=12, batch=batch)
    sigma = torch.tensor([0.03, 0.08], dtype=torch.float64)
    estimator = KernelEstimator(kernel_size=k, regularization="none", beta=1e3, num_iterations=3, channel_mode=channel_mode)
    out = estimator(y, estimates, sigma, kernel=warm, anchor=anchor, anchor_weight=2e4)
    expected = numpy_hqs(y, estimates, sigma.numpy(), warm, 1e3, 3, joint=channel_mode == "joint", anchor=anchor, gamma=2e4)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    free = estimator(y, estimates, sigma, kernel=warm)
    torch.testing.assert_close(estimator(y, estimates, sigma, kernel=warm, anchor=anchor, anchor_weight=0.0), free)
    assert (out - anchor).abs().sum() < (free - anchor).abs().sum()  # pulled toward the anchor


def test_a_heavy_anchor_holds_the_kernel_against_the_data():
    x = smooth_images(seed=13)
    y = fft_blur(x, random_kernel(5, seed=14))
    anchor = random_kernel(5, seed=15)
    estimator = KernelEstimator(kernel_size=5, regularization="none", beta=1e5, num_iterations=5)
    held = estimator(y, x, 10 / 255, kernel=dirac_kernel(5, dtype=torch.float64), anchor=anchor, anchor_weight=1e12)
    torch.testing.assert_close(held, anchor, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="anchor"):
        estimator(y, x, 10 / 255, anchor=random_kernel(3, seed=1), anchor_weight=1.0)


# ---------------------------------------------------------------- batches and particles
def test_batch_of_two_equals_each_alone(device, dtype):
    x = smooth_images(2, 3, 24, seed=9, dtype=dtype).to(device)
    kernels = random_kernel(5, seed=10, batch=2, dtype=dtype).to(device)
    y = fft_blur(x, kernels)
    sigma = torch.tensor([0.02, 0.05], dtype=dtype, device=device)
    estimator = KernelEstimator(kernel_size=5, regularization="l1", lambda_=1e-4, beta=1e3, num_iterations=5).to(device)
    out = estimator(y, x, sigma)
    assert out.shape == (2, 1, 5, 5) and out.dtype == dtype and out.device.type == device.type
    tol = {"atol": 1e-6, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    for b in range(2):
        torch.testing.assert_close(out[b : b + 1], estimator(y[b : b + 1], x[b : b + 1], float(sigma[b])), **tol)
    assert not torch.allclose(out[0], out[1], **tol)


def test_particles_are_grouped_per_image():
    batch, n = 2, 3
    y = smooth_images(batch, 3, 16, seed=11)
    estimates = smooth_images(batch * n, 3, 16, seed=12)
    estimator = KernelEstimator(kernel_size=5, regularization="none", beta=1e3, num_iterations=4)
    out = estimator(y, estimates, 0.05)
    assert out.shape == (batch, 1, 5, 5)
    for b in range(batch):
        alone = estimator(y[b : b + 1], estimates[b * n : (b + 1) * n], 0.05)
        torch.testing.assert_close(out[b : b + 1], alone, atol=1e-12, rtol=1e-10)
    # the order of the particles of one image does not matter, their grouping does
    permuted = estimates[[2, 0, 1, 3, 4, 5]]
    torch.testing.assert_close(estimator(y, permuted, 0.05), out, atol=1e-12, rtol=1e-10)
    regrouped = estimates[[0, 1, 3, 2, 4, 5]]
    assert not torch.allclose(estimator(y, regrouped, 0.05), out)


def test_identical_particles_identities():
    """n copies of one estimate: with α scaled by n it equals one particle; without, one particle at σ/√n."""
    n = 4
    y = smooth_images(1, 3, 16, seed=13) + 0.01
    x = smooth_images(1, 3, 16, seed=14)
    copies = x.expand(n, -1, -1, -1)
    warm = gaussian_kernel(5, 1.0).double()
    kwargs = dict(kernel_size=5, regularization="none", beta=1e3, num_iterations=3)
    single = KernelEstimator(**kwargs)(y, x, 0.05, kernel=warm)
    scaled = KernelEstimator(scale_alpha_by_particles=True, **kwargs)(y, copies, 0.05, kernel=warm)
    unscaled = KernelEstimator(**kwargs)(y, copies, 0.05, kernel=warm)
    torch.testing.assert_close(scaled, single, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(unscaled, KernelEstimator(**kwargs)(y, x, 0.05 / n**0.5, kernel=warm), atol=1e-12, rtol=1e-10)
    assert not torch.allclose(unscaled, single)


def test_uncertainty_term_is_an_extra_tikhonov_weight():
    """With a zero warm start and one iteration, the Pi-GDM term n·N·r² acts like a larger α: σ'² = σ² + nNr²/β."""
    n, beta, sigma, r = 2, 1e3, 0.05, 0.01
    y = smooth_images(1, 3, 16, seed=15)
    estimates = smooth_images(n, 3, 16, seed=16)
    zero = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    kwargs = dict(kernel_size=5, regularization="none", beta=beta, num_iterations=1)
    pigdm = KernelEstimator(uncertainty="pigdm", **kwargs)(y, estimates, sigma, kernel=zero, r=r)
    equivalent = (sigma**2 + n * 16 * 16 * r**2 / beta) ** 0.5
    plain = KernelEstimator(**kwargs)(y, estimates, equivalent, kernel=zero)
    torch.testing.assert_close(pigdm, plain, atol=1e-12, rtol=1e-10)
    # r = None, or uncertainty="none", ignore the term
    none = KernelEstimator(**kwargs)(y, estimates, sigma, kernel=zero)
    torch.testing.assert_close(KernelEstimator(uncertainty="pigdm", **kwargs)(y, estimates, sigma, kernel=zero), none)
    torch.testing.assert_close(KernelEstimator(**kwargs)(y, estimates, sigma, kernel=zero, r=r), none)
    assert not torch.allclose(pigdm, none)


def test_scale_alpha_by_particles_pulls_harder_to_the_warm_start():
    n = 4
    truth = smooth_images(1, 3, 24, seed=17)
    k_true = random_kernel(7, seed=18)
    y = fft_blur(truth, k_true)
    gen = torch.Generator().manual_seed(19)
    particles = truth + 0.05 * torch.randn(n, 3, 24, 24, generator=gen, dtype=torch.float64)
    warm = dirac_kernel(7, dtype=torch.float64)
    kwargs = dict(kernel_size=7, regularization="none", beta=1e4, num_iterations=2)
    distances = {}
    for scale in (False, True):
        out = KernelEstimator(scale_alpha_by_particles=scale, **kwargs)(y, particles, 0.05, kernel=warm)
        distances[scale] = (out - warm).norm().item()
    assert distances[True] < distances[False]


def test_pigdm_uncertainty_shrinks_the_data_fit():
    """A larger r (less trust in x̂0) moves the estimate away from the data solution, monotonically."""
    truth = smooth_images(1, 3, 24, seed=20)
    k_true = random_kernel(5, seed=21)
    y = fft_blur(truth, k_true)
    estimator = KernelEstimator(kernel_size=5, regularization="none", beta=100.0, num_iterations=40, uncertainty="pigdm")
    errors = [(estimator(y, truth, 0.01, r=r) - k_true).norm().item() for r in (0.0, 0.01, 0.05, 0.2)]
    assert errors[0] < 1e-6
    assert errors[0] < errors[1] < errors[2] < errors[3]


# ---------------------------------------------------------------- prior steps
def test_prior_steps_formulas():
    kernel = random_kernel(5, seed=22)
    lam, beta = 2.0, 1e3
    l1 = KernelEstimator(kernel_size=5, regularization="l1", lambda_=lam, beta=beta)
    expected = (kernel - lam / beta).clamp_min(0)
    torch.testing.assert_close(l1.prior_step(kernel), expected / expected.sum())
    l2 = KernelEstimator(kernel_size=5, regularization="l2", lambda_=lam, beta=beta)
    torch.testing.assert_close(l2.prior_step(kernel), kernel)  # βk/(2λ+β) then sum 1: a no-op on sum-1 kernels
    none = KernelEstimator(kernel_size=5, regularization="none")
    assert none.prior_step(kernel) is kernel and none.denoiser is None


def test_pnp_prior_uses_the_denoiser_at_sqrt_lambda_over_beta():
    torch.manual_seed(23)
    estimator = KernelEstimator(kernel_size=7, lambda_=1.0, beta=1e5)
    assert estimator.denoiser_sigma == pytest.approx((1.0 / 1e5) ** 0.5)
    kernel = random_kernel(7, seed=24, dtype=torch.float32)
    raw = estimator.denoiser(kernel, (1.0 / 1e5) ** 0.5).clamp_min(0)
    torch.testing.assert_close(estimator.prior_step(kernel), raw / raw.sum())
    # λ = 0 skips the denoiser: PnP with λ = 0 equals no regularisation
    x = smooth_images(1, 3, 16, seed=25, dtype=torch.float32)
    y = fft_blur(x, kernel)
    no_prior = KernelEstimator(kernel_size=7, lambda_=0.0, beta=1e3, num_iterations=3)
    torch.testing.assert_close(
        no_prior(y, x, 0.02), KernelEstimator(kernel_size=7, regularization="none", beta=1e3, num_iterations=3)(y, x, 0.02)
    )
    out = estimator(y, x, 0.02)
    assert out.shape == (1, 1, 7, 7) and (out >= 0).all() and abs(out.sum().item() - 1) < 1e-5


# ---------------------------------------------------------------- errors
def test_errors():
    y = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="regularization"):
        KernelEstimator(regularization="tv")
    with pytest.raises(ValueError, match="uncertainty"):
        KernelEstimator(uncertainty="full")
    for bad in (dict(kernel_size=0), dict(num_iterations=0), dict(beta=0.0), dict(lambda_=-1.0)):
        with pytest.raises(ValueError):
            KernelEstimator(**bad)
    estimator = KernelEstimator(kernel_size=5, regularization="none", num_iterations=1)
    with pytest.raises(ValueError, match="estimates"):
        estimator(y, torch.rand(3, 3, 16, 16), 0.05)  # 3 is not a multiple of 2
    with pytest.raises(ValueError, match="estimates"):
        estimator(y, torch.rand(2, 1, 16, 16), 0.05)  # channels differ
    with pytest.raises(ValueError, match="estimates"):
        estimator(y, torch.rand(2, 3, 16, 15), 0.05)  # size differs
    with pytest.raises(ValueError, match="estimates"):
        estimator(y, torch.rand(3, 16, 16), 0.05)
    with pytest.raises(ValueError, match="measurement"):
        estimator(y[0], y[0], 0.05)
    with pytest.raises(ValueError, match="larger than the image"):
        KernelEstimator(kernel_size=17, regularization="none")(y, y, 0.05)
    with pytest.raises(ValueError, match="larger than the image"):
        estimator(y, y, 0.05, kernel=torch.rand(1, 1, 17, 17))
    with pytest.raises(ValueError, match="kernel"):
        estimator(y, y, 0.05, kernel=torch.rand(1, 1, 5, 4))  # not square
    with pytest.raises(ValueError, match="kernel"):
        estimator(y, y, 0.05, kernel=torch.rand(3, 1, 5, 5))  # batch neither 1 nor B
    with pytest.raises(ValueError, match="kernel"):
        estimator(y, y, 0.05, kernel=torch.rand(5, 5))


# ---------------------------------------------------------------- persistence and dtypes
def test_save_and_load_restores_the_denoiser(tmp_path):
    torch.manual_seed(26)
    estimator = KernelEstimator(kernel_size=5, lambda_=0.5, beta=1e4, num_iterations=2, denoiser_hidden_channels=8)
    with torch.no_grad():
        for p in estimator.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    estimator.save_pretrained(tmp_path)
    loaded = KernelEstimator.from_pretrained(tmp_path)
    assert loaded.config.lambda_ == 0.5 and loaded.config.denoiser_hidden_channels == 8
    for name, value in estimator.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    y = smooth_images(1, 3, 16, seed=27, dtype=torch.float32)
    x = smooth_images(1, 3, 16, seed=28, dtype=torch.float32)
    torch.testing.assert_close(loaded(y, x, 0.05), estimator(y, x, 0.05))
    torch.manual_seed(29)
    fresh = KernelEstimator(kernel_size=5, lambda_=0.5, beta=1e4, num_iterations=2, denoiser_hidden_channels=8)
    assert not torch.allclose(fresh(y, x, 0.05), estimator(y, x, 0.05))


def test_from_denoiser_copies_the_weights():
    torch.manual_seed(30)
    denoiser = KernelDenoiser(hidden_channels=16, num_layers=4, input_scale=49.0)
    estimator = KernelEstimator.from_denoiser(denoiser, kernel_size=7, lambda_=1.0, beta=1e5)
    assert estimator.config.regularization == "pnp"
    assert estimator.denoiser.config.hidden_channels == 16 and estimator.denoiser.config.input_scale == 49.0
    kernel = random_kernel(7, seed=31, dtype=torch.float32)
    torch.testing.assert_close(estimator.denoiser(kernel, 0.003), denoiser(kernel, 0.003))
    # a copy: changing the source afterwards leaves the estimator unchanged
    before = estimator.denoiser(kernel, 0.003)
    with torch.no_grad():
        next(denoiser.parameters()).add_(1.0)
    torch.testing.assert_close(estimator.denoiser(kernel, 0.003), before)


@pytest.mark.parametrize("low_precision", [torch.float16, torch.bfloat16])
def test_half_precision_measurement_is_computed_in_float32(low_precision):
    x = smooth_images(1, 3, 16, seed=32, dtype=torch.float32)
    k_true = random_kernel(5, seed=33, dtype=torch.float32)
    y = fft_blur(x, k_true)
    y_low, x_low = y.to(low_precision), x.to(low_precision)
    estimator = KernelEstimator(kernel_size=5, regularization="none", beta=1e3, num_iterations=20)
    out = estimator(y_low, x_low, 0.01)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # exactly the float32 computation on the quantised inputs
    torch.testing.assert_close(out, estimator(y_low.float(), x_low.float(), 0.01))
    # and still a reasonable kernel despite the quantisation
    assert (out - k_true).square().mean() < 1e-4
    pnp = KernelEstimator(kernel_size=5, num_iterations=2)(y_low, x_low, 0.01, kernel=k_true.to(low_precision))
    assert pnp.dtype == torch.float32 and torch.isfinite(pnp).all()


# ---------------------------------------------------------------- channel_mode="joint"
@pytest.mark.parametrize("image_size, kernel_size, particles", [(32, 7, 1), (12, 7, 2)])
def test_joint_channel_mode_matches_independent_numpy(image_size, kernel_size, particles):
    y = smooth_images(batch=1, size=image_size, seed=11)
    x = smooth_images(batch=particles, size=image_size, seed=12)
    sigma = torch.tensor([0.03])
    k0 = random_kernel(kernel_size, seed=13)
    estimator = KernelEstimator(kernel_size=kernel_size, regularization="none", beta=50.0, num_iterations=3, channel_mode="joint")
    ours = estimator(y, x, sigma, k0)
    reference = numpy_hqs(y, x, sigma.numpy(), k0, beta=50.0, iterations=3, joint=True)
    torch.testing.assert_close(ours, reference, rtol=1e-7, atol=1e-10)


def test_joint_channel_mode_is_not_pulled_back_by_featureless_channels():
    """Two flat channels carry no information on the kernel: the joint solve ignores them, the mean does not."""
    x = smooth_images(seed=21)
    x[:, 1:] = 0.5  # only the red channel has texture
    k_true = motion_kernel(7, 0.5, generator=22).double()
    y = fft_blur(x, k_true)
    kwargs = dict(kernel_size=7, regularization="none", beta=1e3, num_iterations=5)
    joint = KernelEstimator(channel_mode="joint", **kwargs)(y, x, 0.02)
    mean = KernelEstimator(channel_mode="mean", **kwargs)(y, x, 0.02)
    joint_error, mean_error = (joint - k_true).square().sum(), (mean - k_true).square().sum()
    assert joint_error < 0.2 * mean_error


def test_channel_mode_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="channel_mode"):
        KernelEstimator(channel_mode="sum")
    KernelEstimator(kernel_size=9, channel_mode="joint").save_pretrained(tmp_path)
    assert KernelEstimator.from_pretrained(tmp_path).config.channel_mode == "joint"


def test_bad_arguments_of_a_direct_call_are_refused_clearly():
    estimator = KernelEstimator(kernel_size=5, regularization="none", num_iterations=2)
    y = smooth_images(2, size=16)
    x = smooth_images(2, size=16, seed=1)
    cases = [
        (dict(sigma=-0.02), "sigma must be finite and >= 0"),
        (dict(sigma=[0.01, 0.02, 0.03]), "one number or one per image"),
        (dict(sigma=0.02, r=-0.1), "r must be finite"),
        (dict(sigma=0.02, anchor=dirac_kernel(5, 2, dtype=torch.float64), anchor_weight=float("nan")), "anchor_weight"),
        (dict(sigma=0.02, anchor=dirac_kernel(5, 3, dtype=torch.float64), anchor_weight=1.0), "anchor must be"),
        (dict(sigma=0.02, kernel=torch.zeros(2, 1, 0, 0, dtype=torch.float64)), "empty"),
        (dict(sigma=0.02, mask=torch.zeros(2, 1, 16, 16)), "no observed pixel"),
        (dict(sigma=0.02, mask=torch.full((2, 1, 16, 16), 0.5)), "0 .* and 1"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            estimator(y, x, **kwargs)
    with pytest.raises(TypeError, match="floating-point"):
        estimator((y * 255).to(torch.uint8), x, 0.02)


def test_a_direct_call_keeps_no_graph():
    estimator = KernelEstimator(kernel_size=5, num_iterations=2)  # a PnP denoiser with trainable weights
    kernel = estimator(smooth_images(1, size=16, dtype=torch.float32), smooth_images(1, size=16, seed=1, dtype=torch.float32), 0.02)
    assert not kernel.requires_grad and kernel.grad_fn is None


def test_a_weightless_folder_takes_the_loading_arguments(tmp_path):
    KernelEstimator(kernel_size=7, regularization="l2").save_pretrained(tmp_path)
    for weights in tmp_path.glob("diffusion_pytorch_model*"):
        weights.unlink()  # a config-only folder, as a user may write one by hand
    loaded = KernelEstimator.from_pretrained(tmp_path, torch_dtype=torch.float64, kernel_size=11)
    assert loaded.config.kernel_size == 11 and loaded.dtype == torch.float64
    with pytest.raises(ValueError, match="scale_alpha_by_particles"):
        KernelEstimator(scale_alpha_by_particles="no")
