"""Tests of the ``diffusers-blind`` command line on a tiny random pipeline (CPU, offline, fast)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_blind import FastEMDeblurPipeline, KernelEstimator
from diffusers_blind.cli import main
from diffusers_blind.ops import fft_blur


STEPS = ["--steps", "2", "--kernel-size", "5", "--guard", "off"]  # tiny random models explain nothing


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run fastest on one thread (and far faster than on oversubscribed shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Fast EM pipeline folder written by ``save_pretrained``."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, variance_type="fixed_small",
        timestep_spacing="linspace",
    )
    path = tmp_path_factory.mktemp("model")
    FastEMDeblurPipeline(unet, scheduler, KernelEstimator(kernel_size=5, num_iterations=2)).save_pretrained(path)
    return str(path)


def smooth_array(height, width, channels, seed):
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 4 + 2, width // 4 + 2, channels))
    image = PIL.Image.fromarray((coarse * 255).astype(np.uint8).squeeze())
    return np.asarray(image.resize((width, height), PIL.Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Sharp 30×22 RGB and 26×19 grayscale PNGs, and blurry versions made by ``blur`` in ``blurry/``."""
    root = tmp_path_factory.mktemp("inputs")
    PIL.Image.fromarray(smooth_array(22, 30, 3, 0), mode="RGB").save(root / "rgb.png")
    PIL.Image.fromarray(smooth_array(19, 26, 1, 1), mode="L").save(root / "gray.png")
    for name in ("rgb", "gray"):
        code = main(["blur", str(root / f"{name}.png"), "-o", str(root / "blurry" / f"{name}.png"),
                     "--kernel-size", "5", "--sigma", "5", "--seed", "1"])
        assert code == 0
    return root


def deblur(args, model_dir, out_dir, *extra):
    return main(["deblur", *args, "-o", str(out_dir), "--model", model_dir, *STEPS, "--seed", "0", *extra])


# ---------------------------------------------------------------------------- blur
def test_blur_writes_image_kernel_and_json(inputs):
    blurry = PIL.Image.open(inputs / "blurry" / "rgb.png")
    assert blurry.mode == "RGB" and blurry.size == (30, 22)
    gray = PIL.Image.open(inputs / "blurry" / "gray.png")
    assert gray.mode == "L" and gray.size == (26, 19)
    kernel = np.load(inputs / "blurry" / "rgb_true_kernel.npy")
    assert kernel.shape == (5, 5) and (kernel >= 0).all()
    np.testing.assert_allclose(kernel.sum(), 1.0, atol=1e-5)
    assert PIL.Image.open(inputs / "blurry" / "rgb_true_kernel.png").size == (40, 40)
    record = json.loads((inputs / "blurry" / "rgb_blur.json").read_text())
    assert record["settings"] == {"kernel": "motion", "kernel_size": 5, "intensity": 0.5, "sigma": 5.0,
                                  "seed": 1, "mode": "reflect"}
    assert record["image_size"] == {"width": 30, "height": 22}


def test_blur_output_that_is_a_folder_is_refused(inputs, tmp_path, capsys):
    folder = tmp_path / "bdir"
    folder.mkdir()
    for output in (str(folder), str(folder) + "/"):  # was written as bdir.png beside the folder
        assert main(["blur", str(inputs / "rgb.png"), "-o", output, "--kernel-size", "5"]) == 2
        assert "is a folder" in capsys.readouterr().err
    assert not list(tmp_path.glob("bdir*.*")) and not list(folder.iterdir())


def test_blur_is_reproducible_and_seeded(inputs, tmp_path):
    args = ["blur", str(inputs / "rgb.png"), "--kernel-size", "5", "--sigma", "5"]
    assert main([*args, "-o", str(tmp_path / "a.png"), "--seed", "1"]) == 0
    assert main([*args, "-o", str(tmp_path / "b.png"), "--seed", "2"]) == 0
    first = (inputs / "blurry" / "rgb.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() == first
    assert (tmp_path / "b.png").read_bytes() != first


def test_blur_is_a_true_convolution(inputs, tmp_path):
    """With sigma 0, circular mode equals fft_blur; a kernel whose mass sits 2 rows above the centre shifts up."""
    kernel = np.zeros((5, 5), np.float32)
    kernel[0, 2] = 1.0
    np.save(tmp_path / "shift.npy", kernel)
    out = tmp_path / "shifted.png"
    assert main(["blur", str(inputs / "rgb.png"), "-o", str(out), "--kernel", str(tmp_path / "shift.npy"),
                 "--sigma", "0", "--mode", "circular"]) == 0
    sharp = np.asarray(PIL.Image.open(inputs / "rgb.png"))
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)), np.roll(sharp, -2, axis=0))

    gauss = tmp_path / "gauss.png"
    assert main(["blur", str(inputs / "rgb.png"), "-o", str(gauss), "--kernel", "gaussian", "--kernel-size", "5",
                 "--gaussian-std", "1.5", "--sigma", "0", "--mode", "reflect"]) == 0
    k = torch.from_numpy(np.load(tmp_path / "gauss_true_kernel.npy"))[None, None]
    x = torch.from_numpy(sharp.astype(np.float32) / 255).permute(2, 0, 1)[None]
    expected = (fft_blur(x, k)[0].permute(1, 2, 0).numpy() * 255).round()
    got = np.asarray(PIL.Image.open(gauss)).astype(np.float64)
    np.testing.assert_allclose(got[2:-2, 2:-2], expected[2:-2, 2:-2], atol=1)  # interior: boundaries differ


def test_blur_turbulence_tilts_then_blurs_and_saves_the_field(inputs, tmp_path, capsys):
    """--turbulence: y = k * T_d(x) + n with the seeded field saved beside the output; with a 1×1 kernel and
    sigma 0 the output is exactly the bilinear warp of the sharp image by the saved field."""
    from diffusers_blind.ops import warp

    np.save(tmp_path / "dirac.npy", np.ones((1, 1), np.float32))
    out = tmp_path / "tilted.png"
    args = ["blur", str(inputs / "rgb.png"), "--kernel", str(tmp_path / "dirac.npy"), "--sigma", "0", "--turbulence",
            "--max-tilt", "2"]
    assert main([*args, "-o", str(out), "--seed", "3"]) == 0
    field = np.load(tmp_path / "tilted_true_tilt.npy")
    assert field.shape == (2, 22, 30) and field.dtype == np.float32
    assert 0 < np.abs(field).max() <= 2 + 1e-6 and np.abs(field).std() > 0.05
    sharp = np.asarray(PIL.Image.open(inputs / "rgb.png")).astype(np.float32) / 255
    x = torch.from_numpy(sharp).permute(2, 0, 1)[None]
    expected = (warp(x, torch.from_numpy(field)[None])[0].permute(1, 2, 0).numpy() * 255).round()
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)).astype(np.float32), expected)
    assert not np.array_equal(expected, (sharp * 255).round())  # the tilt moved pixels
    record = json.loads((tmp_path / "tilted_blur.json").read_text())
    assert record["settings"]["turbulence"] is True and record["settings"]["max_tilt"] == 2.0
    assert record["tilt_npy"] == str(tmp_path / "tilted_true_tilt.npy") and "T_d(x)" in record["degradation"]
    assert "tilt field in" in capsys.readouterr().out

    # seeded: the same seed gives the same field and image, another seed another field
    assert main([*args, "-o", str(tmp_path / "again.png"), "--seed", "3"]) == 0
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "again_true_tilt.npy"), field)
    assert main([*args, "-o", str(tmp_path / "other.png"), "--seed", "4"]) == 0
    assert not np.array_equal(np.load(tmp_path / "other_true_tilt.npy"), field)

    # the kernel and the noise of a seed are those of the plain blur (the field has its own stream)
    plain = ["blur", str(inputs / "rgb.png"), "--kernel-size", "5", "--sigma", "5", "--seed", "1"]
    assert main([*plain, "-o", str(tmp_path / "turb.png"), "--turbulence"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "turb_true_kernel.npy"), np.load(inputs / "blurry" / "rgb_true_kernel.npy"))


def test_blur_turbulence_never_overwrites_unasked(inputs, tmp_path, capsys):
    args = ["blur", str(inputs / "rgb.png"), "--kernel-size", "5", "--turbulence", "-o", str(tmp_path / "t.png")]
    assert main([*args, "--seed", "0"]) == 0
    field = np.load(tmp_path / "t_true_tilt.npy")
    for name in ("t.png", "t_blur.json", "t_true_kernel.npy", "t_true_kernel.png"):
        (tmp_path / name).unlink()  # only the tilt field is left: it alone blocks the run
    assert main([*args, "--seed", "1"]) == 2
    assert "t_true_tilt.npy" in capsys.readouterr().err and not (tmp_path / "t.png").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "t_true_tilt.npy"), field)
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert not np.array_equal(np.load(tmp_path / "t_true_tilt.npy"), field)
    # a plain blur does not touch (or need to replace) a tilt field it does not write
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "p_true_tilt.npy").write_bytes(b"keep")
    assert main(["blur", str(inputs / "rgb.png"), "--kernel-size", "5", "-o", str(tmp_path / "plain" / "p.png")]) == 0
    assert (tmp_path / "plain" / "p_true_tilt.npy").read_bytes() == b"keep"


def test_blur_max_tilt_needs_turbulence_and_a_positive_value(inputs, tmp_path, capsys):
    assert main(["blur", str(inputs / "rgb.png"), "-o", str(tmp_path / "a.png"), "--max-tilt", "1"]) == 2
    assert "--max-tilt applies to --turbulence only" in capsys.readouterr().err
    assert main(["blur", str(inputs / "rgb.png"), "-o", str(tmp_path / "a.png"), "--turbulence", "--max-tilt", "0"]) == 2
    assert "--max-tilt must be a positive" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("flags, refused", [
    (["--gaussian-std", "3"], "--gaussian-std does not apply to --kernel motion"),
    (["--kernel", "gaussian", "--intensity", "0.9"], "--intensity does not apply to --kernel gaussian"),
    (["--kernel", "KERNEL", "--kernel-size", "15"], "--kernel-size does not apply to --kernel FILE"),
])
def test_blur_refuses_kernel_flags_its_kernel_ignores(inputs, tmp_path, capsys, flags, refused):
    kernel = str(inputs / "blurry" / "rgb_true_kernel.npy")
    flags = [kernel if flag == "KERNEL" else flag for flag in flags]
    assert main(["blur", str(inputs / "rgb.png"), "-o", str(tmp_path / "a.png"), *flags]) == 2
    assert refused in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
    kept = [f for f in flags if f in ("--kernel", "gaussian", kernel)]  # the same kernel without the ignored flag
    kept += [] if kernel in kept else ["--kernel-size", "5"]
    assert main(["blur", str(inputs / "rgb.png"), "-o", str(tmp_path / "a.png"), *kept]) == 0


# ---------------------------------------------------------------------------- deblur
def test_deblur_with_a_kernel_refuses_the_blind_only_flags(inputs, model_dir, tmp_path, capsys):
    kernel = str(inputs / "blurry" / "rgb_true_kernel.npy")
    image = str(inputs / "blurry" / "rgb.png")
    for flags in (["--num-scales", "2"], ["--kernel-init", "dirac"], ["--m-step-start", "0.5"],
                  ["--kernel-anchor", "3"]):
        assert main(["deblur", image, "-o", str(tmp_path / "o"), "--model", model_dir, "--steps", "2",
                     "--kernel", kernel, *flags]) == 2
        assert f"{flags[0]} does not apply with --kernel" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert deblur([image], model_dir, tmp_path / "o", "--kernel", kernel, "--quiet") == 0  # --guard off: accepted
    assert json.loads((tmp_path / "o" / "rgb.json").read_text())["settings"]["guard"] is None  # and not applied


def test_deblur_single_rgb(inputs, model_dir, tmp_path, capsys):
    assert deblur([str(inputs / "blurry" / "rgb.png")], model_dir, tmp_path / "out") == 0
    out = tmp_path / "out"
    image = PIL.Image.open(out / "rgb_deblurred.png")
    assert image.mode == "RGB" and image.size == (30, 22)
    kernel = np.load(out / "rgb_kernel.npy")
    assert kernel.shape == (5, 5)
    np.testing.assert_allclose(kernel.sum(), 1.0, atol=1e-4)
    assert PIL.Image.open(out / "rgb_kernel.png").size == (40, 40)
    assert not (out / "rgb_uncertainty.png").exists()
    record = json.loads((out / "rgb.json").read_text())
    assert record["sigma"] == 10.0 and record["sigma_estimated"] is False
    assert record["image_size"] == {"width": 30, "height": 22}
    assert record["model"] == os.path.abspath(model_dir)
    assert record["kernel_size"] == 5 and record["uncertainty"] is None
    settings = record["settings"]
    assert settings["method"] == "fastem-pigdm" and settings["guidance"] == "pigdm" and settings["blind"] is True
    assert settings["steps"] == 2 and settings["particles"] == 1 and settings["seed"] == 0
    assert settings["device"] == "cpu"
    from diffusers_blind import FastEMDeblurPipeline

    # settings has what was asked (no --guidance-scale); used has what ran: the model's saved default
    assert settings["guidance_scale"] is None
    assert record["used"] == {"guidance_scale": FastEMDeblurPipeline.from_pretrained(model_dir).default_guidance_scale(),
                              "steps": 2}
    assert record["timings"]["load_seconds"] >= 0 and record["timings"]["image_seconds"] > 0
    assert "rgb_deblurred.png" in capsys.readouterr().out


def test_deblur_is_reproducible_with_a_seed(inputs, model_dir, tmp_path):
    args = [str(inputs / "blurry" / "rgb.png")]
    assert deblur(args, model_dir, tmp_path / "a", "--quiet") == 0
    assert deblur(args, model_dir, tmp_path / "b", "--quiet") == 0
    for name in ("rgb_deblurred.png", "rgb_kernel.npy", "rgb_kernel.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_deblur_folder_auto_sigma_particles_grayscale(inputs, model_dir, tmp_path, capsys):
    """A folder: both images (sorted), the blur command's kernel previews skipped; auto sigma; uncertainty."""
    out = tmp_path / "out"
    assert deblur([str(inputs / "blurry")], model_dir, out, "--sigma", "auto", "--particles", "2") == 0
    assert "skipped 2 file(s)" in capsys.readouterr().err  # gray_kernel.png and rgb_kernel.png
    for name, mode, size in (("gray", "L", (26, 19)), ("rgb", "RGB", (30, 22))):
        image = PIL.Image.open(out / f"{name}_deblurred.png")
        assert image.mode == mode and image.size == size
        uncertainty = PIL.Image.open(out / f"{name}_uncertainty.png")
        assert uncertainty.mode == "L" and uncertainty.size == size
        assert np.load(out / f"{name}_uncertainty.npy").shape == size[::-1]
        record = json.loads((out / f"{name}.json").read_text())
        assert record["sigma_estimated"] is True and record["settings"]["sigma"] == "auto"
        assert 0 < record["sigma"] < 255 and record["sigma"] != 10.0
        assert record["uncertainty"]["max"] > 0 and record["settings"]["particles"] == 2
    assert sorted(p.name for p in out.glob("*.json")) == ["gray.json", "rgb.json"]


def test_deblur_rgba_and_non_blind_kernel(inputs, model_dir, tmp_path):
    rgb = np.asarray(PIL.Image.open(inputs / "blurry" / "rgb.png"))
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], axis=-1)
    PIL.Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    kernel_file = inputs / "blurry" / "rgb_true_kernel.npy"
    assert deblur([str(tmp_path / "alpha.png")], model_dir, tmp_path / "out", "--kernel", str(kernel_file),
                  "--quiet") == 0
    assert PIL.Image.open(tmp_path / "out" / "alpha_deblurred.png").mode == "RGB"
    np.testing.assert_allclose(np.load(tmp_path / "out" / "alpha_kernel.npy"), np.load(kernel_file), atol=1e-6)
    record = json.loads((tmp_path / "out" / "alpha.json").read_text())
    assert record["settings"]["blind"] is False and record["input_mode"] == "RGBA"


def test_deblur_other_methods(inputs, model_dir, tmp_path, capsys):
    image = str(inputs / "blurry" / "gray.png")
    assert deblur([image], model_dir, tmp_path / "dps", "--method", "fastem-dps", "--quiet") == 0
    assert "1000 steps" in capsys.readouterr().err
    assert json.loads((tmp_path / "dps" / "gray.json").read_text())["settings"]["guidance"] == "dps"
    assert deblur([image], model_dir, tmp_path / "em", "--method", "diffusion-em", "--em-iterations", "2",
                  "--quiet") == 0
    assert json.loads((tmp_path / "em" / "gray.json").read_text())["settings"]["em_iterations"] == 2
    assert deblur([image], model_dir, tmp_path / "dp", "--method", "fastem-diffpir", "--quiet") == 0
    settings = json.loads((tmp_path / "dp" / "gray.json").read_text())["settings"]
    assert settings["guidance"] == "diffpir" and settings["blind"] is True
    kernel_file = tmp_path / "dp" / "gray_kernel.npy"
    assert main(["deblur", image, "-o", str(tmp_path / "dpk"), "--model", model_dir, "--steps", "2", "--seed", "0",
                 "--method", "diffpir-known-kernel", "--kernel", str(kernel_file), "--quiet"]) == 0
    settings = json.loads((tmp_path / "dpk" / "gray.json").read_text())["settings"]
    assert settings["guidance"] == "diffpir" and settings["blind"] is False


# ---------------------------------------------------------------------------- errors
def check_error(capsys, code, *fragments):
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err


def test_friendly_errors(inputs, model_dir, tmp_path, capsys):
    image = str(inputs / "blurry" / "rgb.png")
    check_error(capsys, deblur([str(tmp_path / "missing.png")], model_dir, tmp_path / "o"), "input not found")
    (tmp_path / "empty").mkdir()
    check_error(capsys, deblur([str(tmp_path / "empty")], model_dir, tmp_path / "o"), "no images")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    check_error(capsys, deblur([str(tmp_path / "broken.png")], model_dir, tmp_path / "o"), "cannot read image")
    code = main(["deblur", image, "-o", str(tmp_path / "o"), "--model", str(tmp_path / "no_model")])
    check_error(capsys, code, "model folder not found", "save_pretrained")
    (tmp_path / "half_model").mkdir()
    code = main(["deblur", image, "-o", str(tmp_path / "o"), "--model", str(tmp_path / "half_model")])
    check_error(capsys, code, "no model_index.json")
    check_error(capsys, deblur([image], model_dir, tmp_path / "o", "--em-iterations", "2"), "diffusion-em")
    check_error(capsys, deblur([image], model_dir, tmp_path / "o", "--kernel", str(tmp_path / "k.npy")),
                "kernel file not found")
    check_error(capsys, main(["deblur", image, "-o", str(tmp_path / "o"), "--sigma", "loud"]), "sigma")
    check_error(capsys, main(["blur", image, "-o", str(tmp_path / "b.png")]), "too large")  # 33 > 22 pixels
    check_error(capsys, main(["blur", image, "-o", str(tmp_path / "b.jpg"), "--kernel-size", "5"]), ".png")
    check_error(capsys, main(["blur", str(tmp_path / "nope.png"), "-o", str(tmp_path / "b.png")]), "not found")
    assert not (tmp_path / "o").exists()  # nothing is written when the run is refused


def test_deblur_reports_a_failing_image_and_goes_on(inputs, model_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    PIL.Image.new("RGB", (4, 4)).save(folder / "a_tiny.png")  # smaller than the 5x5 kernel
    shutil.copy(inputs / "blurry" / "rgb.png", folder / "b.png")
    check_error(capsys, deblur([str(folder)], model_dir, tmp_path / "out", "--quiet"),
                "a_tiny.png", "larger than the image", "1 of 2 image(s) failed")
    assert (tmp_path / "out" / "b_deblurred.png").exists()
    assert not (tmp_path / "out" / "a_tiny.json").exists()


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "default model" in out and "torch" in out and "diffusers" in out
    assert "fastem-pigdm" in out and "wiener-known-kernel" in out  # the methods registry


def test_console_script_help():
    """The installed ``diffusers-blind`` script (``python -m diffusers_blind.cli`` where it is not on PATH)."""
    script = shutil.which("diffusers-blind")
    command = [script] if script else [sys.executable, "-m", "diffusers_blind.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("deblur", "blur", "info"):
        assert command in result.stdout


def test_deblur_kernel_size_auto_records_the_chosen_size(model_dir, tmp_path):
    PIL.Image.fromarray(smooth_array(64, 64, 3, 2), mode="RGB").save(tmp_path / "big.png")
    assert deblur([str(tmp_path / "big.png")], model_dir, tmp_path / "out", "--kernel-size", "auto") == 0
    record = json.loads((tmp_path / "out" / "big.json").read_text())
    assert record["kernel_size"] in (9, 15, 23)  # the candidates that fit half of a 64 px image
    assert np.load(tmp_path / "out" / "big_kernel.npy").shape == (record["kernel_size"],) * 2
    assert record["settings"]["kernel_size"] == "auto"
    assert deblur([str(tmp_path / "big.png")], model_dir, tmp_path / "out2", "--kernel-size", "large") == 2


def record_fastem_calls(monkeypatch, pick):
    """Spy on ``FastEMDeblurPipeline.__call__``: the list gets ``pick(kwargs)`` for every call, which still runs."""
    from diffusers_blind import FastEMDeblurPipeline

    seen = []
    original = FastEMDeblurPipeline.__call__

    def spy(self, image, **kwargs):
        seen.append(pick(kwargs))
        return original(self, image, **kwargs)

    monkeypatch.setattr(FastEMDeblurPipeline, "__call__", spy)
    return seen


def test_deblur_strength_reaches_the_pipeline(inputs, model_dir, tmp_path, monkeypatch):
    seen = record_fastem_calls(monkeypatch, lambda kwargs: kwargs.get("strength"))
    image = [str(inputs / "blurry" / "rgb.png")]
    assert deblur(image, model_dir, tmp_path / "a", "--strength", "0.5") == 0
    assert json.loads((tmp_path / "a" / "rgb.json").read_text())["settings"]["strength"] == 0.5
    assert deblur(image, model_dir, tmp_path / "b") == 0
    assert seen == [0.5, None]  # unset: the pipeline's default (1, from pure noise)
    for bad in ("0", "1.5", "half"):
        assert deblur(image, model_dir, tmp_path / "c", "--strength", bad) == 2
    assert deblur(image, model_dir, tmp_path / "d", "--method", "diffusion-em", "--strength", "0.5") == 2
    monkeypatch.undo()  # the record of a run without --steps names the pipeline's own default
    assert main(["deblur", *image, "-o", str(tmp_path / "e"), "--model", model_dir, "--seed", "0", "--kernel-size", "5",
                 "--guard", "off", "--strength", "0.1"]) == 0
    assert json.loads((tmp_path / "e" / "rgb.json").read_text())["settings"]["steps"] == 50


def test_deblur_kernel_init_and_m_step_start_reach_the_pipeline(inputs, model_dir, tmp_path, monkeypatch):
    seen = record_fastem_calls(monkeypatch, lambda kwargs: (kwargs.get("kernel_init"), kwargs.get("m_step_start")))
    image = [str(inputs / "blurry" / "rgb.png")]
    assert deblur(image, model_dir, tmp_path / "a", "--kernel-init", "dirac", "--m-step-start", "0.5") == 0
    record = json.loads((tmp_path / "a" / "rgb.json").read_text())
    assert record["settings"]["kernel_init"] == "dirac" and record["settings"]["m_step_start"] == 0.5
    assert seen == [("dirac", 0.5)]
    assert deblur(image, model_dir, tmp_path / "b", "--m-step-start", "1.5") == 2
    assert deblur(image, model_dir, tmp_path / "c", "--kernel-init", "box") == 2


def test_deblur_num_scales_reaches_the_pipeline(inputs, model_dir, tmp_path, monkeypatch):
    seen = record_fastem_calls(monkeypatch, lambda kwargs: kwargs.get("num_scales", "unset"))
    image = [str(inputs / "blurry" / "rgb.png")]
    assert deblur(image, model_dir, tmp_path / "a", "--num-scales", "2") == 0
    assert json.loads((tmp_path / "a" / "rgb.json").read_text())["settings"]["num_scales"] == 2
    assert deblur(image, model_dir, tmp_path / "b") == 0
    assert seen == [2, "unset"]  # unset: the pipeline's default (1)
    for bad in ("0", "9", "two"):
        assert deblur(image, model_dir, tmp_path / "c", "--num-scales", bad) == 2
    assert deblur(image, model_dir, tmp_path / "d", "--method", "diffusion-em", "--num-scales", "2") == 2
