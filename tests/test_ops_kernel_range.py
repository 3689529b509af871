"""The kernel ↔ model-range map of the kernel diffusion prior."""

import pytest
import torch

from diffusers_blind.ops import (
    gaussian_kernel,
    kernel_to_model_range,
    model_range_to_kernel,
    motion_kernel,
    unnormalized_kernel,
)


def test_round_trip_restores_sum_one_kernels():
    kernels = torch.cat([motion_kernel(32, 0.7, generator=1), gaussian_kernel(32, 2.5), motion_kernel(32, 0.2, 5)])
    image = kernel_to_model_range(kernels)
    assert image.amax(dim=(-2, -1)).allclose(torch.ones(3, 1)) and image.min() >= -1
    torch.testing.assert_close(model_range_to_kernel(image), kernels, atol=1e-7, rtol=1e-5)


def test_normalisation_is_per_batch_element():
    # two kernel images of very different mass: each must come back with sum 1 on its own
    a = -torch.ones(1, 1, 8, 8)
    a[..., 3, 3] = 1.0
    b = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    both = model_range_to_kernel(torch.cat([a, b]))
    torch.testing.assert_close(both.sum(dim=(-2, -1)), torch.ones(2, 1))
    torch.testing.assert_close(both[0:1], model_range_to_kernel(a))
    torch.testing.assert_close(both[1:2], model_range_to_kernel(b))
    assert both[0, 0, 3, 3] == 1.0


def test_out_of_range_values_are_clipped_and_all_background_gives_a_dirac():
    image = torch.full((1, 1, 5, 5), -3.0)
    kernel = model_range_to_kernel(image)
    assert kernel[0, 0, 2, 2] == 1 and kernel.sum() == 1
    assert unnormalized_kernel(torch.tensor([[[[2.0, -2.0]]]])).tolist() == [[[[1.0, 0.0]]]]


def test_the_l1_norm_of_the_unnormalised_kernel_has_a_gradient_but_the_sum_one_kernel_has_none():
    raw = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9).requires_grad_(True)
    (grad_sum_one,) = torch.autograd.grad(model_range_to_kernel(raw).abs().sum(), raw)
    assert grad_sum_one.abs().max() < 1e-6  # ‖k/Σk‖₁ ≡ 1: what the public code penalises
    (grad_u,) = torch.autograd.grad(unnormalized_kernel(raw).abs().sum(), raw)
    torch.testing.assert_close(grad_u, torch.full_like(raw, 0.5))


@pytest.mark.parametrize("bad", [torch.ones(1, 8, 8), -torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)])
def test_bad_kernels_are_rejected(bad):
    with pytest.raises(ValueError, match="kernel"):
        kernel_to_model_range(bad)


def test_median_background_is_removed_per_element_and_changes_nothing_on_a_clean_background():
    kernels = torch.cat([motion_kernel(16, 0.5, generator=2), gaussian_kernel(16, 1.0)])
    clean = kernel_to_model_range(kernels)
    torch.testing.assert_close(model_range_to_kernel(clean, background="median"), kernels, atol=1e-7, rtol=1e-5)
    drifted = clean.clone()
    drifted[0] = (drifted[0] + 1) * 0.6 - 0.4  # background at -0.4: a grey pedestal, peak still at +0.8
    assert model_range_to_kernel(drifted)[0].amax() < 0.5 * kernels[0].amax()  # u / Σu: the pedestal takes the mass
    torch.testing.assert_close(model_range_to_kernel(drifted, background="median")[0], kernels[0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(model_range_to_kernel(drifted, background="median")[1], kernels[1], atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="background"):
        model_range_to_kernel(clean, background="mean")
