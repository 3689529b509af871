"""The M-step under a mask of observed pixels: the exact support-constrained least squares, solved by PCG."""

import pytest
import torch

from diffusers_blind import KernelEstimator
from diffusers_blind.ops import conjugate_gradient, fft_blur, motion_kernel, pad_kernel
from diffusers_blind.ops.blur import crop_kernel


def _masked_problem(seed=0, batch=2, channels=3, particles=2, shape=(30, 34), size=5):
    torch.manual_seed(seed)
    sharp = torch.nn.functional.interpolate(torch.rand(batch, channels, 8, 8), size=shape, mode="bicubic").double()
    kernel = torch.cat([motion_kernel(size, 0.6, i + 1) for i in range(batch)]).double()
    y = fft_blur(sharp, kernel) + 0.01 * torch.randn(batch, channels, *shape, dtype=torch.float64)
    estimates = sharp.repeat_interleave(particles, 0) + 0.02 * torch.randn(batch * particles, channels, *shape, dtype=torch.float64)
    mask = torch.zeros(1, 1, *shape, dtype=torch.float64)
    mask[..., 6:-5, 4:-7] = 1
    return y, estimates, mask, kernel


def _dense_solution(y, estimates, mask, z, ridge, alpha, size, joint):
    """``(XᵀMX + ρI)⁻¹(XᵀMy + αz)`` with ``X`` built column by column (one column per kernel tap)."""
    batch, channels = y.shape[:2]
    n = estimates.shape[0] // batch
    solutions = []
    for b in range(batch):
        systems = [list(range(channels))] if joint else [[c] for c in range(channels)]
        per_system = []
        for chans in systems:
            columns, target = [], []
            for i in range(n):
                x = estimates[b * n + i][chans]
                cols = []
                for tap in range(size * size):
                    unit = torch.zeros(1, 1, size, size, dtype=torch.float64)
                    unit.view(-1)[tap] = 1
                    blurred = torch.fft.ifft2(torch.fft.fft2(x) * torch.fft.fft2(pad_kernel(unit, x.shape[-2:]))).real
                    cols.append((mask[0] * blurred).flatten())
                columns.append(torch.stack(cols, 1))
                target.append((mask[0] * y[b][chans]).flatten())
            design, rhs = torch.cat(columns), torch.cat(target)
            lhs = design.T @ design + ridge * torch.eye(size * size, dtype=torch.float64)
            per_system.append(torch.linalg.solve(lhs, design.T @ rhs + alpha * z[b].flatten()).reshape(size, size))
        solutions.append(torch.stack(per_system).mean(0))
    return torch.stack(solutions)[:, None]


@pytest.mark.parametrize("channel_mode", ["joint", "mean"])
def test_masked_data_step_matches_dense_least_squares(channel_mode):
    y, estimates, mask, kernel = _masked_problem()
    size, alpha = kernel.shape[-1], 0.7
    estimator = KernelEstimator(kernel_size=size, regularization="none", channel_mode=channel_mode).double()
    z = torch.rand(2, 1, size, size, dtype=torch.float64)
    n = estimates.shape[0] // 2
    step = estimator._masked_data_step(y, estimates.reshape(2, n, *y.shape[1:]), mask, alpha, alpha, None, size, 200)
    dense = _dense_solution(y, estimates, mask, z, alpha, alpha, size, channel_mode == "joint")
    torch.testing.assert_close(step(z), dense, rtol=1e-6, atol=1e-8)
    few = estimator._masked_data_step(y, estimates.reshape(2, n, *y.shape[1:]), mask, alpha, alpha, None, size, 1)(z)
    assert (few - dense).abs().max() > 1e-6  # one iteration is measurably short of the solution


def test_masked_estimate_ignores_unobserved_pixels():
    """Garbage outside the mask changes nothing; the exact kernel is found from clean data."""
    y, _, mask, kernel = _masked_problem(particles=1)
    torch.manual_seed(1)
    sharp = torch.rand(2, 3, *y.shape[-2:], dtype=torch.float64)  # white: every frequency of the kernel is seen
    clean = fft_blur(sharp, kernel)
    garbage = torch.where(mask.bool(), clean, torch.rand_like(clean))
    estimator = KernelEstimator(kernel_size=kernel.shape[-1], regularization="none", beta=1e-6, num_iterations=20).double()
    masked = estimator(garbage, sharp, 1e-3, mask=mask, cg_iterations=50)
    torch.testing.assert_close(masked, kernel, atol=1e-4, rtol=0)
    again = estimator(torch.where(mask.bool(), clean, torch.zeros_like(clean)), sharp, 1e-3, mask=mask, cg_iterations=50)
    torch.testing.assert_close(again, masked, atol=1e-10, rtol=0)
    unmasked = estimator(garbage, sharp, 1e-3)
    assert (unmasked - kernel).abs().max() > 1e-2  # the full-grid solve is misled by the garbage


def test_masked_estimator_rejects_bad_masks_and_iterations():
    estimator = KernelEstimator(kernel_size=5, regularization="none")
    y = torch.rand(1, 3, 20, 20)
    with pytest.raises(ValueError, match="mask"):
        estimator(y, y, 0.01, mask=torch.ones(1, 3, 20, 20))
    with pytest.raises(ValueError, match="cg_iterations"):
        estimator(y, y, 0.01, mask=torch.ones(1, 1, 20, 20), cg_iterations=0)


def test_conjugate_gradient_solves_an_spd_system_per_sample_and_warm_starts():
    torch.manual_seed(0)
    a = torch.randn(2, 6, 6, dtype=torch.float64)
    matrix = a @ a.transpose(1, 2) + torch.eye(6, dtype=torch.float64)
    rhs = torch.randn(2, 6, 1, dtype=torch.float64)
    apply = lambda v: matrix @ v  # noqa: E731
    exact = torch.linalg.solve(matrix, rhs)
    torch.testing.assert_close(conjugate_gradient(apply, rhs, 6), exact)
    near = exact + 1e-3 * torch.randn_like(exact)

    def energy_error(v):  # CG lowers the error in the A-norm at every iteration
        error = v - exact
        return (error.transpose(1, 2) @ matrix @ error).flatten()

    assert (energy_error(conjugate_gradient(apply, rhs, 1, initial=near)) < energy_error(near)).all()
    diagonal = torch.diagonal(matrix, dim1=1, dim2=2).unsqueeze(-1)
    torch.testing.assert_close(conjugate_gradient(apply, rhs, 6, precondition=lambda v: v / diagonal), exact)
