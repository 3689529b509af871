"""The seeded tilt-field generator of the turbulence model."""

import numpy as np
import pytest
import torch

from diffusers_blind.ops import TiltMapGenerator, TiltOperator, tilt_map


def test_shape_range_and_seeding():
    a, b = tilt_map(40, 56, generator=3), tilt_map(40, 56, generator=3)
    assert a.shape == (1, 2, 40, 56) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert (a - tilt_map(40, 56, generator=4)).abs().max() > 0.1
    assert tilt_map(32, 32, max_tilt=0.3, generator=0).abs().max() <= 0.3


def test_statistics_do_not_depend_on_the_size():
    """Patch density is kept: the per-pixel std is about the same from 32² to 256² (≈0.4 px), mean about 0.

    Below the 64-px patch the patches are cut to the map; 32² maps used to have half the spread (0.21 px).
    """
    stds = []
    for size, count in ((32, 32), (48, 16), (64, 16), (256, 2)):
        fields = TiltMapGenerator(size)(count, generator=np.random.default_rng(0))
        assert fields.shape == (count, 2, size, size)
        assert abs(fields.mean()) < 0.05
        stds.append(float(fields.std()))
    assert all(0.3 < std < 0.55 for std in stds) and max(stds) - min(stds) < 0.1
    assert abs(float(tilt_map(32, 128, generator=0).std()) - stds[-1]) < 0.1  # one side below the patch


def test_maps_of_at_least_the_patch_size_keep_their_patch_count():
    """The count is raised only for maps smaller than the patch: 64 x 80 draws round(500·64·80/256²) = 39 patches."""
    default, explicit = tilt_map(64, 80, generator=5), tilt_map(64, 80, num_patches=39, generator=5)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    small = tilt_map(32, 32, generator=5)
    torch.testing.assert_close(small, tilt_map(32, 32, num_patches=31, generator=5), rtol=0, atol=0)  # 7.8 · (64/32)²


def test_fields_are_smooth_and_both_channels_are_independent():
    field = TiltMapGenerator(128)(4, generator=1)
    neighbour = torch.corrcoef(torch.stack([field[..., :, :-1].flatten(), field[..., :, 1:].flatten()]))[0, 1]
    cross = torch.corrcoef(torch.stack([field[:, 0].flatten(), field[:, 1].flatten()]))[0, 1]
    assert neighbour > 0.7 and abs(cross) < 0.1


def test_a_generated_field_warps_an_image():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    field = tilt_map(32, 32, generator=0)
    y = TiltOperator()(x, field)
    assert y.shape == x.shape and (y - x).abs().mean() > 0.01


@pytest.mark.parametrize("kwargs", [dict(height=0, width=8), dict(height=8, width=8, max_tilt=0),
                                    dict(height=8, width=8, max_tilt=float("nan")), dict(height=8, width=8, patch_size=0),
                                    dict(height=8, width=8, strength_range=(0.5, 0.1))])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        tilt_map(**kwargs)


def test_simulate_turbulence_is_tilt_then_blur_and_seeded():
    from diffusers_blind.ops import BlurOperator, gaussian_kernel, simulate_turbulence

    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    y, kernel, field = simulate_turbulence(x, generator=5)
    y2, _, field2 = simulate_turbulence(x, generator=5)
    torch.testing.assert_close(y, y2)
    assert field.shape == (2, 2, 40, 40) and (field[0] - field[1]).abs().max() > 0  # one field per image
    torch.testing.assert_close(kernel, gaussian_kernel(33, 3.0))
    expected = BlurOperator("reflect")(TiltOperator("border")(x, field), kernel)
    torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError, match="image must be"):
        simulate_turbulence(x[0])
