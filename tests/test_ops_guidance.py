"""Pi-GDM guidance and the DPS residual against explicit circulant-matrix algebra."""

import pytest
import torch

from diffusers_blind.ops import dps_residual_norm, fft_blur, pigdm_guidance


def circulant_blur_matrix(kernel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (HW × HW) matrix of the circular true convolution with ``kernel`` (centre at index k//2).

    Row ``(i, j)`` holds ``k[m, n]`` at column ``((i − m + kh//2) mod H, (j − n + kw//2) mod W)``.
    """
    kh, kw = kernel.shape
    matrix = torch.zeros(height * width, height * width, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            for m in range(kh):
                for n in range(kw):
                    src = ((i - m + kh // 2) % height) * width + (j - n + kw // 2) % width
                    matrix[i * width + j, src] += kernel[m, n].double()
    return matrix


def explicit_pigdm(measurement, x0, kernel, sigma, r, mask=None):
    """``Hᵀ (r² H Hᵀ + σ² I)⁻¹ (y − H x0)`` channel by channel with dense linear algebra (one sample).

    ``H`` is the circular blur, or with a 0/1 ``mask`` the valid blur ``H = M K`` (``M`` diagonal)."""
    channels, height, width = x0.shape
    h = circulant_blur_matrix(kernel, height, width)
    if mask is not None:
        h = torch.diag(mask.reshape(-1).double()) @ h
    n = height * width
    system = r**2 * h @ h.T + sigma**2 * torch.eye(n, dtype=torch.float64)
    out = torch.empty(channels, n, dtype=torch.float64)
    for c in range(channels):
        residual = measurement[c].reshape(n).double() - h @ x0[c].reshape(n).double()
        out[c] = h.T @ torch.linalg.solve(system, residual)
    return out.reshape(channels, height, width)


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    kernel = torch.rand(2, 1, 3, 3, generator=gen, dtype=torch.float64)
    return y, x0, kernel / kernel.sum(dim=(-2, -1), keepdim=True)


@pytest.mark.parametrize("sigma, r", [(0.05, 0.3), (0.2, 0.05), (0.04, 1.0)])
def test_pigdm_guidance_equals_matrix_formula(problem, sigma, r):
    y, x0, kernel = problem
    out = pigdm_guidance(y, x0, kernel, sigma, r)
    assert out.shape == x0.shape and out.dtype == torch.float64
    for b in range(2):
        expected = explicit_pigdm(y[b], x0[b], kernel[b, 0], sigma, r)
        torch.testing.assert_close(out[b], expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kernel_size", [4, (2, 5)])
def test_pigdm_guidance_even_and_rectangular_kernels(kernel_size):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 1, 6, 7, generator=gen, dtype=torch.float64)
    y = torch.rand(1, 1, 6, 7, generator=gen, dtype=torch.float64)
    kernel = torch.rand(1, 1, kh, kw, generator=gen, dtype=torch.float64)
    out = pigdm_guidance(y, x0, kernel, 0.1, 0.4)
    torch.testing.assert_close(out[0], explicit_pigdm(y[0], x0[0], kernel[0, 0], 0.1, 0.4), atol=1e-9, rtol=1e-9)


def test_pigdm_guidance_r_zero_is_scaled_adjoint_residual(problem, device):
    y, x0, kernel = (t.to(device) for t in problem)
    sigma = 0.07
    out = pigdm_guidance(y, x0, kernel, sigma, 0.0)
    for b in range(2):
        h = circulant_blur_matrix(kernel[b, 0].cpu(), 6, 6)
        residual = y[b].cpu().reshape(3, 36) - x0[b].cpu().reshape(3, 36) @ h.T
        expected = (residual @ h) / sigma**2  # rows: Hᵀ r for each channel
        torch.testing.assert_close(out[b].cpu(), expected.reshape(3, 6, 6), atol=1e-8, rtol=1e-9)


def test_pigdm_guidance_sigma_zero_inverts_the_blur():
    """With σ = 0 (replaced by 1e-8) and an invertible blur: H G = (y − H x0) / r²."""
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(1, 2, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.rand(1, 2, 8, 8, generator=gen, dtype=torch.float64)
    kernel = torch.tensor([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]], dtype=torch.float64)[None, None]
    r = 0.5
    out = pigdm_guidance(y, x0, kernel, 0.0, r)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(fft_blur(out, kernel), (y - fft_blur(x0, kernel)) / r**2, atol=1e-7, rtol=1e-7)


def test_pigdm_guidance_both_zero_is_an_error():
    y = torch.rand(1, 1, 6, 6)
    kernel = torch.ones(1, 1, 3, 3) / 9
    with pytest.raises(ValueError, match="sigma > 0 or r > 0"):
        pigdm_guidance(y, y, kernel, 0.0, 0.0)
    with pytest.raises(ValueError, match="sigma > 0 or r > 0"):
        pigdm_guidance(y, y, kernel, torch.tensor([0.0]), 0.0)
    with pytest.raises(ValueError, match="sigma > 0 or r > 0"):
        pigdm_guidance(torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6), kernel, torch.tensor([0.1, 0.0]), torch.tensor([0.2, 0.0]))
    # a zero in only one of the two is fine
    assert torch.isfinite(pigdm_guidance(y, y * 0.5, kernel, torch.tensor([0.0]), 0.3)).all()
    assert torch.isfinite(pigdm_guidance(y, y * 0.5, kernel, 0.1, torch.tensor([0.0]))).all()


@pytest.mark.parametrize("sigma, r", [(-0.1, 0.2), (0.1, -0.2), (float("nan"), 0.2), (torch.tensor([0.1, -0.1]), 0.2),
                                      (0.1, torch.tensor([0.2, float("nan")]))])
def test_pigdm_guidance_refuses_negative_or_nan_sigma_and_r(sigma, r):
    """A negative sigma used to be clamped to 1e-8 silently (a near-noiseless guidance)."""
    y = torch.rand(2, 1, 6, 6)
    with pytest.raises(ValueError, match="sigma >= 0 and r >= 0"):
        pigdm_guidance(y, y * 0.5, torch.ones(1, 1, 3, 3) / 9, sigma, r)


def test_conjugate_gradient_is_exported():
    from diffusers_blind import ops
    from diffusers_blind.ops.cg import conjugate_gradient

    assert "conjugate_gradient" in ops.__all__ and ops.conjugate_gradient is conjugate_gradient
    assert all(hasattr(ops, name) for name in ops.__all__)


def test_pigdm_guidance_per_batch_sigma_and_r(problem, device):
    y, x0, kernel = (t.to(device) for t in problem)
    sigma = torch.tensor([0.05, 0.2], dtype=torch.float64, device=device)
    r = torch.tensor([0.3, 0.0], dtype=torch.float64, device=device)
    out = pigdm_guidance(y, x0, kernel, sigma, r)
    for b in range(2):
        single = pigdm_guidance(y[b : b + 1], x0[b : b + 1], kernel[b : b + 1], float(sigma[b]), float(r[b]))
        torch.testing.assert_close(out[b : b + 1], single)
        expected = explicit_pigdm(y[b].cpu(), x0[b].cpu(), kernel[b, 0].cpu(), float(sigma[b]), float(r[b]))
        torch.testing.assert_close(out[b].cpu(), expected, atol=1e-9, rtol=1e-9)


def test_pigdm_guidance_broadcast_kernel_and_float32(device, dtype, tol):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 3, 8, 8, generator=gen, dtype=dtype).to(device)
    y = torch.rand(3, 3, 8, 8, generator=gen, dtype=dtype).to(device)
    kernel = torch.rand(1, 1, 3, 3, generator=gen, dtype=dtype).to(device)
    kernel = kernel / kernel.sum()
    out = pigdm_guidance(y, x0, kernel, 0.1, 0.2)
    assert out.dtype == dtype and out.device.type == device.type
    torch.testing.assert_close(out, pigdm_guidance(y, x0, kernel.expand(3, 1, 3, 3), 0.1, 0.2), **tol)
    reference = pigdm_guidance(y.double(), x0.double(), kernel.double(), 0.1, 0.2)
    torch.testing.assert_close(out.double(), reference, atol=1e-4 if dtype == torch.float32 else 1e-12, rtol=1e-4)


def test_pigdm_step_lowers_the_data_residual(device):
    gen = torch.Generator().manual_seed(4)
    truth = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64).to(device)
    kernel = torch.rand(2, 1, 5, 5, generator=gen, dtype=torch.float64).to(device)
    kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
    sigma = 0.02
    y = fft_blur(truth, kernel) + sigma * torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64).to(device)
    x0 = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64).to(device)
    r = 0.3
    guidance = pigdm_guidance(y, x0, kernel, sigma, r)
    before = dps_residual_norm(y, x0, kernel)
    for eta in (1e-3, 1e-2, r**2):
        after = dps_residual_norm(y, x0 + eta * guidance, kernel)
        assert (after < before).all(), (eta, before, after)
    # the guidance is a descent direction of ½‖y − Hx‖²: ⟨G, −∇⟩ = ⟨G, Hᵀ(y − Hx0)⟩ > 0
    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(0.5 * (y - fft_blur(x, kernel)).square().sum(), x)
    assert ((guidance * -grad).flatten(1).sum(1) > 0).all()


def test_dps_residual_norm_per_sample(problem, device):
    y, x0, kernel = (t.to(device) for t in problem)
    norms = dps_residual_norm(y, x0, kernel)
    assert norms.shape == (2,)
    for b in range(2):
        h = circulant_blur_matrix(kernel[b, 0].cpu(), 6, 6)
        residual = y[b].cpu().reshape(3, 36) - x0[b].cpu().reshape(3, 36) @ h.T
        torch.testing.assert_close(norms[b].cpu(), torch.linalg.norm(residual), atol=1e-10, rtol=1e-10)
    # samples are independent: changing sample 1 leaves the norm of sample 0 unchanged
    x1 = x0.clone()
    x1[1] += 1
    changed = dps_residual_norm(y, x1, kernel)
    assert changed[0] == norms[0] and changed[1] != norms[1]
    # zero exactly at the solution
    assert dps_residual_norm(fft_blur(x0, kernel), x0, kernel).abs().max() < 1e-12


def test_dps_residual_norm_gradient(problem):
    """∇_x ‖y − Hx‖ = −Hᵀ(y − Hx)/‖y − Hx‖, per sample."""
    y, x0, kernel = problem
    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dps_residual_norm(y, x, kernel).sum(), x)
    residual = y - fft_blur(x0, kernel)
    norms = residual.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = -pigdm_guidance(y, x0, kernel, 1.0, 0.0) / norms
    torch.testing.assert_close(grad, expected)


# ------------------------------------------------------------------------------------------ any operator
from diffusers_blind.ops import (  # noqa: E402
    BlurOperator,
    TiltBlurOperator,
    TiltOperator,
    dps_joint_gradient,
    kernel_l1,
)


def tilt_blur_problem(seed=2):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 7, 8, generator=gen, dtype=torch.float64)
    y = torch.rand(2, 3, 7, 8, generator=gen, dtype=torch.float64)
    kernel = torch.rand(2, 1, 3, 4, generator=gen, dtype=torch.float64) + 0.1
    field = (torch.rand(2, 2, 7, 8, generator=gen, dtype=torch.float64) - 0.5) * 2.6
    return y, x0, kernel / kernel.sum((-2, -1), keepdim=True), field


@pytest.mark.parametrize("operator", [BlurOperator("reflect"), BlurOperator("zeros"), TiltOperator(), TiltBlurOperator()],
                         ids=repr)
def test_dps_residual_norm_takes_any_operator(operator):
    y, x0, kernel, field = tilt_blur_problem()
    params = {"kernel": kernel, "field": field}
    chosen = [params[name] for name in operator.param_names]
    norms = dps_residual_norm(y, x0, *chosen, operator=operator)
    for b in range(2):
        expected = (y[b] - operator(x0[b : b + 1], *(p[b : b + 1] for p in chosen))[0]).norm()
        torch.testing.assert_close(norms[b], expected)
    with pytest.raises(ValueError, match="takes"):
        dps_residual_norm(y, x0, operator=operator)


def test_joint_gradient_over_image_kernel_and_tilt():
    """Through two 'denoisers' (x0 = f(x_t), k = g(k_t)) and a free tilt field: the gradients are autograd's."""
    y, x0, kernel, field = tilt_blur_problem(3)
    x_t = x0.clone().requires_grad_(True)
    k_t = kernel.clone().requires_grad_(True)
    d = field.clone().requires_grad_(True)
    operator = TiltBlurOperator()

    def unknowns():
        return torch.tanh(x_t), torch.softmax(k_t.flatten(1), 1).view_as(k_t)

    x_hat, k_hat = unknowns()
    result = dps_joint_gradient(y, x_hat, (k_hat, d), (x_t, k_t, d), operator=operator, scale=2.0,
                                kernel_regularizer=lambda k: 0.3 * kernel_l1(k))
    x_hat, k_hat = unknowns()
    loss = 2 * (y - operator(x_hat, k_hat, d)).flatten(1).norm(dim=1).sum() + 0.3 * k_hat.abs().sum()
    expected = torch.autograd.grad(loss, (x_t, k_t, d))
    for got, want in zip(result.gradients, expected):
        torch.testing.assert_close(got, want)
        assert want.abs().sum() > 0
    torch.testing.assert_close(result.loss, loss.detach())
    assert result.residual_norm.shape == (2,) and not result.loss.requires_grad


def test_joint_gradient_regulariser_adds_its_own_gradient_and_unused_inputs_get_zeros():
    y, x0, kernel, _ = tilt_blur_problem(4)
    x = x0.clone().requires_grad_(True)
    k = kernel.clone().requires_grad_(True)
    unused = torch.zeros(3, requires_grad=True)
    plain = dps_joint_gradient(y, x, (k,), (x, k, unused), operator=BlurOperator("zeros"))
    regularised = dps_joint_gradient(y, x, (k,), (x, k, unused), operator=BlurOperator("zeros"),
                                     kernel_regularizer=lambda kern: 0.5 * kernel_l1(kern))
    torch.testing.assert_close(regularised.gradients[0], plain.gradients[0])  # the image is not regularised
    torch.testing.assert_close(regularised.gradients[1], plain.gradients[1] + 0.5)  # d‖k‖₁/dk = sign(k) = 1
    assert regularised.gradients[2].abs().sum() == 0
    # the circular default agrees with the Pi-GDM closed form at r = 0: ∇‖y − Hx‖ = −Hᵀ(y − Hx)/‖·‖
    default = dps_joint_gradient(y, x, (kernel,), (x,)).gradients[0]
    norms = (y - fft_blur(x0, kernel)).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(default, -pigdm_guidance(y, x0, kernel, 1.0, 0.0) / norms)


def test_joint_gradient_errors():
    y, x0, kernel, field = tilt_blur_problem(5)
    with pytest.raises(ValueError, match="require grad"):
        dps_joint_gradient(y, x0, (kernel,), (x0,))
    x = x0.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="kernel_regularizer"):
        dps_joint_gradient(y, x, (field,), (x,), operator=TiltOperator(), kernel_regularizer=kernel_l1)


def test_residual_weight_makes_masked_pixels_unobserved():
    from diffusers_blind.ops import gaussian_kernel
    from diffusers_blind.ops.blur import edge_taper_window
    from diffusers_blind.ops.guidance import dps_residual_norm, pigdm_guidance

    g = torch.Generator().manual_seed(0)
    y, x0 = torch.rand(2, 3, 24, 28, generator=g, dtype=torch.float64), torch.rand(2, 3, 24, 28, generator=g, dtype=torch.float64)
    kernel = gaussian_kernel(5, 1.2).to(torch.float64).expand(2, 1, 5, 5)
    ones = torch.ones(1, 1, 24, 28, dtype=torch.float64)
    torch.testing.assert_close(pigdm_guidance(y, x0, kernel, 0.05, 0.1, residual_weight=ones),
                               pigdm_guidance(y, x0, kernel, 0.05, 0.1))
    mask = edge_taper_window((24, 28), 0, region=(5, 5, 14, 18), dtype=torch.float64)
    changed = y + (1 - mask) * torch.rand(y.shape, generator=g, dtype=torch.float64)  # new values only where unobserved
    torch.testing.assert_close(pigdm_guidance(changed, x0, kernel, 0.05, 0.1, residual_weight=mask),
                               pigdm_guidance(y, x0, kernel, 0.05, 0.1, residual_weight=mask))
    assert not torch.allclose(pigdm_guidance(changed, x0, kernel, 0.05, 0.1), pigdm_guidance(y, x0, kernel, 0.05, 0.1))
    torch.testing.assert_close(dps_residual_norm(changed, x0, kernel, residual_weight=mask),
                               dps_residual_norm(y, x0, kernel, residual_weight=mask))
    assert torch.all(pigdm_guidance(y, x0, kernel, 0.05, 0.1, residual_weight=torch.zeros_like(ones)) == 0)


@pytest.mark.parametrize("sigma, r", [(0.004, 0.3), (0.04, 0.05)])
def test_masked_pigdm_solves_the_valid_blur_posterior_by_conjugate_gradients(sigma, r):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 12, 13, generator=gen, dtype=torch.float64)
    y = torch.rand(2, 3, 12, 13, generator=gen, dtype=torch.float64)
    kernel = torch.rand(2, 1, 5, 5, generator=gen, dtype=torch.float64)
    kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
    mask = torch.zeros(1, 1, 12, 13, dtype=torch.float64)
    mask[..., 3:-3, 2:-4] = 1
    expected = torch.stack([explicit_pigdm(y[b], x0[b], kernel[b, 0], sigma, r, mask) for b in range(2)])

    def error(iterations):
        out = pigdm_guidance(y, x0, kernel, sigma, r, residual_weight=mask, cg_iterations=iterations, cg_tolerance=0)
        return float((out - expected).norm() / expected.norm())

    # no iteration: the circulant inverse applied to the masked residual, an approximation
    assert error(0) > 1e-2
    assert error(5) < error(0)
    assert error(300) < 1e-4  # converged: the exact valid-blur Pi-GDM vector
    # without a mask the closed form is exact and the iterations are not used
    torch.testing.assert_close(pigdm_guidance(y, x0, kernel, sigma, r, cg_iterations=7), pigdm_guidance(y, x0, kernel, sigma, r))


def test_masked_pigdm_stops_early_once_converged():
    gen = torch.Generator().manual_seed(4)
    x0, y = torch.rand(1, 1, 10, 10, generator=gen), torch.rand(1, 1, 10, 10, generator=gen)
    kernel = torch.full((1, 1, 3, 3), 1 / 9)
    mask = torch.zeros(1, 1, 10, 10)
    mask[..., 2:-2, 2:-2] = 1
    loose = pigdm_guidance(y, x0, kernel, 0.1, 0.2, residual_weight=mask, cg_iterations=50, cg_tolerance=0.5)
    tight = pigdm_guidance(y, x0, kernel, 0.1, 0.2, residual_weight=mask, cg_iterations=50, cg_tolerance=0)
    assert not torch.equal(loose, tight)  # the loose tolerance stopped before the full 50 iterations
    assert float((loose - tight).norm() / tight.norm()) < 0.5


def test_masked_solve_preconditioner_keeps_window_and_outside_apart():
    """The window's circulant inverse plus the exact σ⁻² outside: fewer iterations than the whole-grid inverse,
    and a right-hand side outside the window is solved exactly too."""
    from diffusers_blind.ops.blur import p2o
    from diffusers_blind.ops.cg import conjugate_gradient
    from diffusers_blind.ops.guidance import masked_posterior_solve

    gen = torch.Generator().manual_seed(5)
    shape = (40, 40)
    mask = torch.zeros(1, 1, *shape, dtype=torch.float64)
    mask[..., 8:-8, 8:-8] = 1
    kernel = torch.rand(1, 1, 9, 9, generator=gen, dtype=torch.float64)
    otf = p2o(kernel / kernel.sum(), shape)
    sigma, r = torch.tensor(0.04, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    denominator = r**2 * otf.abs().square() + sigma**2

    def apply(u):
        return r**2 * mask * torch.fft.ifft2(otf.abs().square() * torch.fft.fft2(mask * u)).real + sigma**2 * u

    rhs = mask * torch.rand(1, 3, *shape, generator=gen, dtype=torch.float64)
    exact = conjugate_gradient(apply, rhs, 500)

    def error(u):
        return float((u - exact).norm() / exact.norm())

    whole_grid = conjugate_gradient(apply, rhs, 5, lambda v: torch.fft.ifft2(torch.fft.fft2(v) / denominator).real)
    windowed = masked_posterior_solve(rhs, otf, mask, sigma, r, denominator, 5)
    assert error(windowed) < 0.5 * error(whole_grid)
    assert error(masked_posterior_solve(rhs, otf, mask, sigma, r, denominator, 60)) < 1e-8
    outside = (1 - mask) * torch.rand(1, 3, *shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(masked_posterior_solve(outside, otf, mask, sigma, r, denominator, 1), outside / sigma**2)
    doubled = 2 * mask  # a weight above 1: the preconditioner stays positive definite, CG converges

    def apply_doubled(u):
        return r**2 * doubled * torch.fft.ifft2(otf.abs().square() * torch.fft.fft2(doubled * u)).real + sigma**2 * u

    reference = conjugate_gradient(apply_doubled, rhs, 500)
    solved = masked_posterior_solve(rhs, otf, doubled, sigma, r, denominator, 200)
    assert float((solved - reference).norm() / reference.norm()) < 1e-6
