"""Contract tests over every forward operator (as deepinv's physics tests do).

Each case in ``OPERATORS`` is an operator and a sampler of its per-call parameters; every contract
(linearity, adjoint identity, equality with an independently built dense matrix, dtypes, shapes,
gradients with respect to every argument) runs on every case, with odd, even and non-square
kernels on non-square images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_blind.ops import fft_blur, spatial_blur
from diffusers_blind.ops.blur import flip_kernel, pad_adjoint
from diffusers_blind.ops.operators import BlurOperator, TiltBlurOperator, TiltOperator


def random_kernel(batch, size, gen, dtype):
    kernel = torch.rand(batch, 1, *size, generator=gen, dtype=torch.float64) + 0.05
    return (kernel / kernel.sum((-2, -1), keepdim=True)).to(dtype)


def random_field(batch, height, width, gen, dtype, amplitude=1.7):
    field = (torch.rand(batch, 2, height, width, generator=gen, dtype=torch.float64) * 2 - 1) * amplitude
    return field.to(dtype)


# ----------------------------------------------------------------------------- independent references
def source_index(i: int, n: int, padding: str) -> int | None:
    """Which pixel of a length-``n`` axis position ``i`` reads, or ``None`` for a zero."""
    if 0 <= i < n:
        return i
    if padding in ("zeros",):
        return None
    if padding == "circular":
        return i % n
    if padding == "border":
        return min(max(i, 0), n - 1)
    return -i if i < 0 else 2 * (n - 1) - i  # reflect


def blur_matrix(kernel: np.ndarray, height: int, width: int, padding: str) -> np.ndarray:
    """``y[i, j] = Σ_{m,n} k[m, n] · x[i − m + kh//2, j − n + kw//2]`` with the padding's rule, as a matrix."""
    kh, kw = kernel.shape
    matrix = np.zeros((height * width, height * width))
    for i in range(height):
        for j in range(width):
            for m in range(kh):
                for n in range(kw):
                    r = source_index(i - m + kh // 2, height, padding)
                    c = source_index(j - n + kw // 2, width, padding)
                    if r is not None and c is not None:
                        matrix[i * width + j, r * width + c] += kernel[m, n]
    return matrix


def tilt_matrix(field: np.ndarray, padding: str) -> np.ndarray:
    """Bilinear read of ``x`` at ``(i + d_y, j + d_x)`` with the padding's rule, as a matrix."""
    _, height, width = field.shape
    matrix = np.zeros((height * width, height * width))
    for i in range(height):
        for j in range(width):
            u, v = j + field[0, i, j], i + field[1, i, j]
            u0, v0 = int(np.floor(u)), int(np.floor(v))
            for dv in (0, 1):
                for du in (0, 1):
                    weight = (1 - abs(v - (v0 + dv))) * (1 - abs(u - (u0 + du)))
                    r = source_index(v0 + dv, height, padding)
                    c = source_index(u0 + du, width, padding)
                    if r is not None and c is not None:
                        matrix[i * width + j, r * width + c] += weight
    return matrix


# ----------------------------------------------------------------------------- the operators under test
class Case:
    def __init__(self, name, operator, sample, dense):
        self.name, self.operator, self.sample, self.dense = name, operator, sample, dense

    def __repr__(self):
        return self.name


def blur_case(padding, convention="convolution", kernel_size=(3, 4)):
    def sample(batch, height, width, gen, dtype):
        return (random_kernel(batch, kernel_size, gen, dtype),)

    def dense(params, height, width):
        kernel = params[0][0, 0].double().numpy()
        kernel = kernel[::-1, ::-1] if convention == "correlation" else kernel
        return blur_matrix(kernel, height, width, padding)

    name = f"blur-{padding}-{convention}-k{kernel_size[0]}x{kernel_size[1]}"
    return Case(name, BlurOperator(padding, convention), sample, dense)


def tilt_case(padding):
    def sample(batch, height, width, gen, dtype):
        return (random_field(batch, height, width, gen, dtype),)

    def dense(params, height, width):
        return tilt_matrix(params[0][0].double().numpy(), padding)

    return Case(f"tilt-{padding}", TiltOperator(padding), sample, dense)


def tilt_blur_case(blur_padding, tilt_padding, kernel_size=(3, 3)):
    def sample(batch, height, width, gen, dtype):
        return random_kernel(batch, kernel_size, gen, dtype), random_field(batch, height, width, gen, dtype)

    def dense(params, height, width):
        kernel, field = params
        blur = blur_matrix(kernel[0, 0].double().numpy(), height, width, blur_padding)
        return blur @ tilt_matrix(field[0].double().numpy(), tilt_padding)

    operator = TiltBlurOperator(BlurOperator(blur_padding), TiltOperator(tilt_padding))
    return Case(f"tiltblur-{blur_padding}-{tilt_padding}", operator, sample, dense)


KERNEL_SIZES = [(3, 3), (4, 4), (2, 3), (5, 4), (1, 1)]
OPERATORS = (
    [blur_case(p, kernel_size=k) for p in ("circular", "reflect", "zeros") for k in KERNEL_SIZES]
    + [blur_case(p, "correlation") for p in ("circular", "reflect", "zeros")]
    + [tilt_case(p) for p in ("border", "zeros", "circular")]
    + [tilt_blur_case("circular", "border"), tilt_blur_case("reflect", "zeros", (4, 2)), tilt_blur_case("zeros", "circular")]
)
SHAPE = (2, 3, 5, 7)  # batch, channels, non-square image


def sample_case(case, dtype, shape=SHAPE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    x = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    return x, y, case.sample(b, h, w, gen, dtype)


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}


# ----------------------------------------------------------------------------- contracts
@pytest.mark.parametrize("case", OPERATORS, ids=repr)
def test_shape_dtype_and_linearity(case, dtype):
    x, y, params = sample_case(case, dtype)
    out = case.operator(x, *params)
    assert out.shape == x.shape and out.dtype == dtype
    assert case.operator.A_adjoint(y, *params).shape == y.shape
    a, b = 0.7, -1.3
    torch.testing.assert_close(
        case.operator.A(a * x + b * y, *params), a * case.operator.A(x, *params) + b * case.operator.A(y, *params),
        **TOL[dtype],
    )


@pytest.mark.parametrize("case", OPERATORS, ids=repr)
def test_adjoint_identity(case, dtype):
    x, y, params = sample_case(case, dtype, seed=1)
    lhs = (case.operator.A(x, *params) * y).sum()
    rhs = (x * case.operator.A_adjoint(y, *params)).sum()
    torch.testing.assert_close(lhs, rhs, **TOL[dtype])


@pytest.mark.parametrize("case", OPERATORS, ids=repr)
def test_equals_a_dense_matrix_built_from_the_definition(case):
    height, width = 5, 6
    x, y, params = sample_case(case, torch.float64, shape=(1, 1, height, width), seed=2)
    matrix = case.dense(params, height, width)
    forward = case.operator.A(x, *params).flatten().numpy()
    adjoint = case.operator.A_adjoint(y, *params).flatten().numpy()
    np.testing.assert_allclose(forward, matrix @ x.flatten().numpy(), atol=1e-12)
    np.testing.assert_allclose(adjoint, matrix.T @ y.flatten().numpy(), atol=1e-12)


@pytest.mark.parametrize("case", OPERATORS, ids=repr)
def test_gradients_with_respect_to_every_argument(case):
    x, y, params = sample_case(case, torch.float64, shape=(1, 2, 5, 6), seed=3)
    x.requires_grad_(True)
    y.requires_grad_(True)
    params = tuple(p.clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(lambda x, *p: case.operator.A(x, *p), (x, *params))
    assert torch.autograd.gradcheck(lambda y, *p: case.operator.A_adjoint(y, *p), (y, *params))


@pytest.mark.parametrize("case", OPERATORS, ids=repr)
def test_broadcast_parameters_equal_per_sample_parameters(case):
    x, _, params = sample_case(case, torch.float64, seed=4)
    first = tuple(p[:1] for p in params)
    torch.testing.assert_close(
        case.operator.A(x, *first), case.operator.A(x, *(p.expand(x.shape[0], *p.shape[1:]) for p in first))
    )
    for b in range(x.shape[0]):  # per-sample parameters are applied to their own image
        torch.testing.assert_close(
            case.operator.A(x, *params)[b], case.operator.A(x[b : b + 1], *(p[b : b + 1] for p in params))[0]
        )


# ----------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 4), (5, 2)])
def test_paddings_agree_in_the_interior_and_match_the_old_functions(kernel_size):
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(1, 2, 16, 17, generator=gen, dtype=torch.float64)
    kernel = random_kernel(1, kernel_size, gen, torch.float64)
    outputs = {p: BlurOperator(p)(x, kernel) for p in ("circular", "reflect", "zeros")}
    interior = (..., slice(4, -4), slice(4, -4))
    torch.testing.assert_close(outputs["reflect"][interior], outputs["circular"][interior])
    torch.testing.assert_close(outputs["zeros"][interior], outputs["circular"][interior])
    torch.testing.assert_close(outputs["circular"], fft_blur(x, kernel), rtol=0, atol=0)
    torch.testing.assert_close(outputs["reflect"], spatial_blur(x, kernel.flip(-2, -1), "reflect"), rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["circular", "reflect", "zeros"])
def test_correlation_convention_is_the_flip(padding):
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(2, 1, 9, 8, generator=gen, dtype=torch.float64)
    kernel = random_kernel(2, (3, 4), gen, torch.float64)
    correlation = BlurOperator(padding, "correlation")(x, kernel)
    torch.testing.assert_close(correlation, BlurOperator(padding)(x, flip_kernel(kernel)))
    torch.testing.assert_close(correlation, spatial_blur(x, kernel, "zeros" if padding == "zeros" else padding))


def test_impulse_response_is_the_kernel_centred_at_k_over_2():
    for size in [(3, 3), (4, 4), (2, 5)]:
        kernel = torch.arange(1.0, 1 + size[0] * size[1]).reshape(1, 1, *size)
        x = torch.zeros(1, 1, 9, 9)
        x[..., 4, 4] = 1
        for padding in ("circular", "reflect", "zeros"):
            out = BlurOperator(padding)(x, kernel)[0, 0]
            top, left = 4 - size[0] // 2, 4 - size[1] // 2
            torch.testing.assert_close(out[top : top + size[0], left : left + size[1]], kernel[0, 0])


def test_zero_tilt_is_the_identity_and_integer_tilt_a_shift():
    x = torch.rand(1, 3, 6, 7, generator=torch.Generator().manual_seed(7))
    tilt = TiltOperator("circular")
    torch.testing.assert_close(tilt(x, torch.zeros(1, 2, 6, 7)), x)
    field = torch.zeros(1, 2, 6, 7)
    field[:, 0], field[:, 1] = 2.0, -1.0  # read 2 columns right, 1 row up
    torch.testing.assert_close(tilt(x, field), torch.roll(x, shifts=(1, -2), dims=(-2, -1)))


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_pad_adjoint_matches_the_gradient_of_f_pad(mode):
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(2, 1, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    pads = (2, 1, 1, 3)
    padded = torch.nn.functional.pad(x, pads, mode=mode)
    cotangent = torch.rand(padded.shape, generator=gen, dtype=torch.float64)
    (expected,) = torch.autograd.grad(padded, x, cotangent)
    torch.testing.assert_close(pad_adjoint(cotangent, pads, mode), expected)


def test_operator_errors():
    with pytest.raises(ValueError, match="padding"):
        BlurOperator("replicate")
    with pytest.raises(ValueError, match="kernel_convention"):
        BlurOperator("zeros", "flipped")
    with pytest.raises(ValueError, match="padding"):
        TiltOperator("reflect")
    x = torch.rand(1, 1, 5, 5)
    with pytest.raises(ValueError, match="tilt field"):
        TiltOperator()(x, torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="larger than the image"):
        BlurOperator("zeros").A_adjoint(x, torch.ones(1, 1, 7, 7) / 49)
    with pytest.raises(ValueError, match="kernel"):
        BlurOperator("reflect")(x, torch.ones(3, 3))


@pytest.mark.parametrize("padding", ["circular", "reflect", "zeros"])
def test_integer_images_are_refused(padding):
    """An integer image used to get an integer kernel (all zeros) and a black result."""
    x = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    k = torch.ones(1, 1, 3, 3) / 9
    for apply in (BlurOperator(padding).A, BlurOperator(padding).A_adjoint):
        with pytest.raises(TypeError, match="floating-point"):
            apply(x, k)


@pytest.mark.parametrize("padding", ["circular", "reflect", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_in_every_padding(padding, dtype):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 12, 10, generator=g), torch.rand(2, 3, 12, 10, generator=g)
    k = torch.rand(1, 1, 5, 4, generator=g)
    k = k / k.sum()
    op = BlurOperator(padding)
    for apply, image in ((op.A, x), (op.A_adjoint, y)):
        out = apply(image.to(dtype), k)
        assert out.dtype == dtype
        tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
        assert torch.allclose(out.float(), apply(image.to(dtype).float(), k), atol=tolerance)
