"""Tests of the one image decoder / processor shared by the pipelines and the command line."""

import io
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_blind import FastEMDeblurPipeline, KernelEstimator
from diffusers_blind.image_processor import DeblurImageProcessor, fft_friendly_size, pad_to_multiple, to_tensor
from diffusers_blind.io import read_image
from diffusers_blind.ops.noise import AUTO_SIGMA_FLOOR, QUANTISATION_SIGMA, estimate_noise_sigma


RAMP16 = (np.arange(24 * 20).reshape(20, 24) * 130).astype(np.uint16)  # 0 … 62270 of 65535


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    unet = UNet2DModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16, in_channels=3,
        out_channels=3, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, variance_type="fixed_small")
    pipe = FastEMDeblurPipeline(unet, scheduler, KernelEstimator(kernel_size=5, num_iterations=2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, image, **kwargs):
    kwargs = {"sigma": 5, "num_inference_steps": 2, "output_type": "np", "generator": torch.manual_seed(0), **kwargs}
    return pipe(image, **kwargs)


def roundtrip(image: PIL.Image.Image, suffix: str) -> PIL.Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "tif": "TIFF"}[suffix])
    buffer.seek(0)
    return PIL.Image.open(buffer)


# ---------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_pil_modes_keep_their_values(mode):
    expected = RAMP16 / 65535.0
    if mode == "I;16":
        image = roundtrip(PIL.Image.fromarray(RAMP16), "png")
    elif mode == "I":
        image = PIL.Image.fromarray(RAMP16.astype(np.int32))
    else:
        image = PIL.Image.fromarray((RAMP16 / 65535.0).astype(np.float32))
    assert image.mode == mode
    tensor = to_tensor(image)
    assert tensor.shape == (1, 1, 20, 24)
    np.testing.assert_allclose(tensor[0, 0].numpy(), expected, atol=1e-6)
    assert 0.3 < tensor.mean().item() < 0.7  # neither all white nor all black (the old convert("L"))


def png_16bit(path, array: np.ndarray, exif: bytes | None = None):
    """A 16-bit PNG written chunk by chunk (Pillow cannot write 16-bit colour): RGB, RGBA or grey."""
    import struct
    import zlib

    height, width = array.shape[:2]
    colour_type = {1: 0, 3: 2, 4: 6}[1 if array.ndim == 2 else array.shape[2]]
    rows = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    extra = chunk(b"eXIf", exif) if exif else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_png_is_read_at_full_precision(tmp_path, channels):
    """Pillow keeps only the high byte of 16-bit colour; the reader recovers the low byte too."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 65536, (5, 7, channels), dtype=np.uint16)
    array[0, 0, :3] = (1, 255, 256)  # values that differ only below the high byte
    decoded, mode = read_image(png_16bit(tmp_path / "c.png", array))
    assert mode == ("RGB;16" if channels == 3 else "RGBA;16") and decoded.shape == (5, 7, 3)
    np.testing.assert_allclose(decoded, array[..., :3] / 65535.0, atol=1e-7)


def test_16bit_colour_keeps_the_exif_orientation(tmp_path):
    array = np.random.default_rng(1).integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded, _ = read_image(png_16bit(tmp_path / "o.png", array, exif.tobytes()))
    np.testing.assert_allclose(decoded, np.rot90(array, -1) / 65535.0, atol=1e-7)


def test_16bit_colour_tiff_is_read_at_full_precision(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    array = np.random.default_rng(2).integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    for name, data in (("le.tif", array), ("be.tif", array.astype(">u2"))):
        tifffile.imwrite(tmp_path / name, data)
        decoded, mode = read_image(tmp_path / name)
        assert mode == "RGB;16"
        np.testing.assert_allclose(decoded, array / 65535.0, atol=1e-7)


def test_a_dark_16bit_grey_file_is_not_taken_for_8_bit(tmp_path):
    """Pillow opens 16-bit PGM and PNG files as 32-bit ``I``: the file's declared depth decides ÷ 65535,
    not whether the values happen to stay below 256."""
    dark = (np.arange(20).reshape(4, 5) * 10).astype(np.uint16)  # 0 … 190 of 65535
    (tmp_path / "d.pgm").write_bytes(b"P5\n5 4\n65535\n" + dark.astype(">u2").tobytes())
    png_16bit(tmp_path / "d.png", dark)
    for name in ("d.pgm", "d.png"):
        decoded, _ = read_image(tmp_path / name)
        np.testing.assert_allclose(decoded, dark / 65535.0, atol=1e-7)
    (tmp_path / "t.pgm").write_bytes(b"P5\n5 4\n1023\n" + dark.astype(">u2").tobytes())  # 10-bit
    np.testing.assert_allclose(read_image(tmp_path / "t.pgm")[0], dark / 1023.0, atol=2e-5)


def test_8bit_values_in_a_32bit_integer_image_are_read_as_8bit():
    array = np.arange(200, dtype=np.int32).reshape(10, 20)
    tensor = to_tensor(PIL.Image.fromarray(array))
    np.testing.assert_allclose(tensor[0, 0].numpy(), array / 255.0, atol=1e-6)


def test_float_tiff_in_0_255_is_rescaled_with_a_warning_not_clipped(tmp_path):
    levels = (RAMP16 / 65535.0 * 255).astype(np.float32)
    path = tmp_path / "levels.tif"
    PIL.Image.fromarray(levels).save(path)
    with pytest.warns(UserWarning, match="divided by 255"):
        array, mode = read_image(path)
    assert mode == "F"
    np.testing.assert_allclose(array, levels / 255.0, atol=1e-6)
    with pytest.warns(UserWarning, match="divided by 255"):  # the Python API reads it the same way
        tensor = to_tensor(PIL.Image.open(path))
    np.testing.assert_allclose(tensor[0, 0].numpy(), array, atol=1e-6)


@pytest.mark.parametrize("values, match", [(np.full((8, 8), -3.0), r"\[0, 1\]"), (np.full((8, 8), 1e6), r"\[0, 1\]")])
def test_float_images_outside_every_known_range_are_errors(values, match):
    with pytest.raises(ValueError, match=match):
        to_tensor(PIL.Image.fromarray(values.astype(np.float32)))


def test_exif_orientation_is_applied_to_pil_input_in_the_api(tmp_path):
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, :5] = 255  # a white band on the left
    image = PIL.Image.fromarray(array)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    tensor = to_tensor(PIL.Image.open(path))
    assert tensor.shape == (1, 3, 30, 10)  # displayed as a portrait
    assert tensor[0, :, :5].mean() > 0.9  # the band is now at the top
    cli_array, _ = read_image(path)  # the same decoder as the command line
    np.testing.assert_array_equal(cli_array, tensor[0].permute(1, 2, 0).numpy())


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK"])
def test_every_common_pil_mode_decodes(mode):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 14, 3), dtype=np.uint8)).convert(mode)
    tensor = to_tensor(image)
    assert tensor.shape[1] == (1 if mode in ("1", "L", "LA") else 3) and tensor.shape[-2:] == (12, 14)
    assert 0 <= tensor.min() and tensor.max() <= 1


# ---------------------------------------------------------------------------- layouts
@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((3, 20, 24), np.float32), "channels-first.*moveaxis"),
        (np.zeros((2, 3, 20, 24), np.float32), "channels-first"),
        (np.zeros((5, 20, 24), np.float32), r"no channel axis.*\[\.\.\., None\]"),
        (torch.zeros(20, 24, 3), "channels-last.*movedim"),
        (torch.zeros(1, 1, 1, 20, 24), "channels-first"),
        (np.zeros((3, 0, 0), np.float32), "channels-first"),
        (torch.zeros(3, 0, 0), "empty"),
        (np.zeros((0, 0, 3), np.float32), "empty"),
        (torch.zeros(0, 3, 8, 8), "empty"),
    ],
)
def test_ambiguous_or_empty_layouts_are_errors_never_guesses(image, match):
    with pytest.raises(ValueError, match=match):
        to_tensor(image)


def test_empty_pil_image_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        to_tensor(PIL.Image.new("RGB", (0, 5)))


def test_tiny_images_follow_the_convention_of_their_type():
    assert to_tensor(np.zeros((4, 4, 3), np.float32)).shape == (1, 3, 4, 4)  # numpy: channels last
    assert to_tensor(torch.zeros(3, 4, 4)).shape == (1, 3, 4, 4)  # torch: channels first


def test_numpy_and_torch_layouts_agree():
    array = np.random.default_rng(0).random((2, 9, 11, 3)).astype(np.float32)
    from_numpy = to_tensor(array)
    assert torch.equal(from_numpy, to_tensor(torch.from_numpy(array).permute(0, 3, 1, 2)))
    assert torch.equal(to_tensor(array[0]), from_numpy[:1])
    assert to_tensor(array[0, ..., 0]).shape == (1, 1, 9, 11)


# ---------------------------------------------------------------------------- padding
def test_pad_and_unpad_round_trip():
    processor = DeblurImageProcessor(pad_multiple=8)
    image = torch.rand(1, 3, 13, 10)
    padded, window = processor.pad(image, margin=3)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert torch.equal(processor.unpad(padded, window), image)
    assert torch.equal(padded[..., 3 - 1, 3:13], image[..., 1, :])  # reflection, not zeros


def test_fft_friendly_sizes_are_7_smooth_multiples_and_minimal():
    for size in range(1, 700):
        for multiple in (1, 8):
            n = fft_friendly_size(size, multiple)
            assert n >= size and n % multiple == 0
            rest = n
            for prime in (2, 3, 5, 7):
                while rest % prime == 0:
                    rest //= prime
            assert rest == 1, (size, multiple, n)
            smaller = [m for m in range(size, n) if m % multiple == 0 and fft_friendly_size(m, 1) == m]
            assert not smaller, (size, multiple, n, smaller)
    assert fft_friendly_size(322, 8) == 336  # the README example with its margin: 328 = 8 * 41 before


def test_fft_friendly_size_refuses_bad_sizes_and_ends_for_any_multiple():
    for bad in (0, -5, True, 2.5):
        with pytest.raises(ValueError, match="positive int"):
            fft_friendly_size(bad, 8)
    with pytest.raises(ValueError, match="multiple"):
        fft_friendly_size(10, 0)
    assert fft_friendly_size(10, 11) == 11 and fft_friendly_size(23, 22) == 44  # no 7-smooth multiple of 11 exists
    assert pad_to_multiple(torch.rand(1, 1, 10, 10), 11, 1, fft_friendly=True)[0].shape[-2:] == (22, 22)


def test_fft_rounding_never_turns_a_reflected_margin_into_replication():
    """22 + 2·20 = 62 → 64: one pad of 22 rows would need replication; the margin is still reflected."""
    image = torch.rand(1, 1, 22, 22)
    padded, window = pad_to_multiple(image, 2, 20, fft_friendly=True)
    assert padded.shape[-2:] == (64, 64) and window == (20, 20, 22, 22)
    plain = pad_to_multiple(image, 2, 20)[0]
    assert torch.equal(padded[..., :62, :62], plain)
    assert torch.equal(padded[..., 19, 20:42], image[..., 1, :])  # reflected, not the edge row repeated


def test_the_processor_config_decides_the_default_padding():
    image = torch.rand(1, 3, 256, 256)
    friendly = DeblurImageProcessor(pad_multiple=8, fft_friendly=True)
    assert friendly.pad(image, 33)[0].shape[-2:] == (336, 336)
    assert friendly.pad(image, 33, fft_friendly=False)[0].shape[-2:] == (328, 328)
    assert DeblurImageProcessor(pad_multiple=8).pad(image, 33)[0].shape[-2:] == (328, 328)


def test_fft_friendly_padding_keeps_the_window_and_the_reflection():
    image = torch.rand(1, 3, 256, 250)
    padded, window = pad_to_multiple(image, 8, 33, fft_friendly=True)
    assert padded.shape[-2:] == (336, 320)
    assert window == (33, 33, 256, 250)
    assert torch.equal(DeblurImageProcessor.unpad(padded, window), image)
    plain, plain_window = pad_to_multiple(image, 8, 33)
    assert plain.shape[-2:] == (328, 320) and plain_window == window
    torch.testing.assert_close(padded[..., :328, :], plain)  # the same reflection, only more of it


@pytest.mark.parametrize("margin, match", [(-1, ">= 0"), (10**9, "larger than the image"), ("5", "integer"), (2.5, "integer")])
def test_bad_margins_are_errors(margin, match):
    with pytest.raises(ValueError, match=match):
        pad_to_multiple(torch.rand(1, 3, 16, 16), 4, margin)


def test_bad_margins_through_the_pipeline(pipe):
    for margin in (-1, 10**9):
        with pytest.raises(ValueError, match="boundary_margin"):
            run(pipe, torch.rand(1, 3, 16, 16), boundary_margin=margin)


# ---------------------------------------------------------------------------- postprocessing
def test_postprocess_mean_std_particles_for_every_output_type():
    processor = DeblurImageProcessor()
    samples = torch.rand(2 * 3, 3, 10, 12)
    window = (1, 2, 6, 7)
    images, std, particles = processor.postprocess(samples, num_particles=3, window=window, output_type="pt")
    cropped = samples[..., 1:7, 2:9].reshape(2, 3, 3, 6, 7)
    torch.testing.assert_close(images, cropped.mean(1))
    torch.testing.assert_close(std, cropped.std(1, unbiased=False).mean(1, keepdim=True))
    assert particles.shape == (2, 3, 3, 6, 7)
    images, std, particles = processor.postprocess(samples, num_particles=3, window=window, output_type="np")
    assert images.shape == (2, 6, 7, 3) and std.shape == (2, 6, 7) and particles.shape == (2, 3, 6, 7, 3)
    images, std, _ = processor.postprocess(samples[:2], num_particles=1, output_type="pil", grayscale=True)
    assert len(images) == 2 and images[0].mode == "L" and std is None
    with pytest.raises(RuntimeError, match="diverged"):
        processor.postprocess(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="output_type"):
        processor.postprocess(samples, output_type="jpeg")


# ---------------------------------------------------------------------------- sigma
def test_sigma_none_is_an_error_that_names_sigma(pipe):
    with pytest.raises(ValueError, match="sigma"):
        run(pipe, torch.rand(1, 3, 16, 16), sigma=None)


def test_auto_sigma_of_a_clean_image_is_floored_above_quantisation_noise(pipe):
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert estimate_noise_sigma(flat).item() == 0.0  # the estimator itself is exact
    assert estimate_noise_sigma(flat, floor=AUTO_SIGMA_FLOOR).item() == pytest.approx(AUTO_SIGMA_FLOOR)
    assert AUTO_SIGMA_FLOOR > QUANTISATION_SIGMA
    out = run(pipe, flat, sigma="auto", blind_sigma_floor=0)  # the blind floor (5 levels) is tested with the pipeline
    assert out.sigma[0] == pytest.approx(AUTO_SIGMA_FLOOR * 255, rel=1e-5)
    assert np.isfinite(out.images).all()
    with pytest.raises(ValueError, match="floor"):
        estimate_noise_sigma(flat, floor=-1.0)


@pytest.mark.skipif(not hasattr(torch, "uint16"), reason="torch without a uint16 dtype")
def test_torch_uint16_and_bool_images_are_rescaled_like_numpy():
    levels = (np.arange(20, dtype=np.int64).reshape(1, 4, 5) * 3000).astype(np.uint16)
    expected = DeblurImageProcessor().preprocess(levels[0])  # numpy (H, W): rescaled by 65535
    tensor = torch.from_numpy(levels.astype(np.int32)).to(torch.uint16)  # torch (1, H, W): was a TypeError
    torch.testing.assert_close(DeblurImageProcessor().preprocess(tensor), expected)
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    mask[0, 1, 2] = True
    assert DeblurImageProcessor().preprocess(mask).sum().item() == 1.0
