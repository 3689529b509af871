"""The support-restricted HQS data step equals the literal full-grid Eq. 24 solve."""

import pytest
import torch

from diffusers_blind import KernelEstimator
from diffusers_blind.ops import fft_blur, motion_kernel


@pytest.mark.parametrize("regularization", ["none", "l1", "l2", "pnp"])
@pytest.mark.parametrize("uncertainty", ["none", "pigdm"])
def test_support_solve_equals_full_grid_solve(regularization, uncertainty):
    torch.manual_seed(0)
    sharp = torch.nn.functional.interpolate(torch.rand(2, 3, 10, 10), size=(40, 44), mode="bicubic").clamp(0, 1)
    kernel = torch.cat([motion_kernel(7, 0.5, 1), motion_kernel(7, 0.8, 2)]).double()
    y = fft_blur(sharp.double(), kernel) + 0.01 * torch.randn(2, 3, 40, 44, dtype=torch.float64)
    estimates = sharp.double().repeat_interleave(3, 0) + 0.02 * torch.randn(6, 3, 40, 44, dtype=torch.float64)
    estimator = KernelEstimator(kernel_size=7, regularization=regularization, num_iterations=4, uncertainty=uncertainty,
                                lambda_=0.3).double()
    sigma, r = torch.tensor([0.01, 0.03]), 0.05
    fast = estimator(y, estimates, sigma, r=r)
    estimator._support_data_step = estimator._full_grid_data_step  # force the literal solve
    literal = estimator(y, estimates, sigma, r=r)
    torch.testing.assert_close(fast, literal, atol=1e-12, rtol=0)


def test_small_image_uses_full_grid_solve():
    """With 2k-1 > H the support window would alias; the estimator must still run and return a kernel."""
    estimator = KernelEstimator(kernel_size=9, regularization="none", num_iterations=3)
    y = torch.rand(1, 3, 12, 12)
    out = estimator(y, y, 0.01)
    assert out.shape == (1, 1, 9, 9) and torch.isclose(out.sum(), torch.tensor(1.0))
