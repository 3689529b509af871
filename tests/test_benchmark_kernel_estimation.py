"""scripts/benchmark_kernel_estimation.py end to end on a tiny pipeline and two small photographs."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import smooth_images, tiny_ddpm, tiny_unet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark_kernel_estimation as bench  # noqa: E402


def test_prints_every_photo_and_a_mean_and_writes_json(tmp_path, capsys):
    from diffusers_blind import FastEMDeblurPipeline, KernelEstimator

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):
        array = (smooth_images(1, 3, 64, 64, seed=index)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(photos / f"p{index}.png")
    pipe = FastEMDeblurPipeline(tiny_unet(), tiny_ddpm(), KernelEstimator(kernel_size=7, regularization="none"))
    pipe.save_pretrained(tmp_path / "model")
    output = tmp_path / "rows.json"
    argv = ["--data_dir", str(photos), "--model", str(tmp_path / "model"), "--size", "24", "--kernel_sizes", "5", "7",
            "--steps", "2", "--ceiling_steps", "2", "--output", str(output)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "p0" in printed and "p1" in printed and "mean" in printed and "oracle − blind" in printed
    rows = json.loads(output.read_text())["rows"]
    assert [row["photo"] for row in rows] == ["p0", "p1"]
    for row in rows:
        assert row["kernel_size"] in (5, 7)
        assert 0 < row["ceiling_mnc"] <= 1 + 1e-6 and 0 < row["blind_mnc"] <= 1 + 1e-6
        assert all(np.isfinite(row[key]) for key in ("blurry_psnr", "blind_psnr", "oracle_psnr"))
        assert 0 <= row["midtone_saturation"] <= 1 and row["contrast_gain"] > 0 and row["true_contrast_gain"] > 0


def test_valid_protocol_blurs_beyond_the_crop():
    """The valid case's blurry crop equals the zero-padded blur of the larger source, centre kept."""
    args = bench.parse_args(["--data_dir", ".", "--size", "16", "--kernel_sizes", "5", "5", "--sigma", "0"])
    path = Path(__file__).resolve().parents[1] / "examples" / "sharp.png"
    sharp, blurry, kernel, scene = bench.make_case(path, 0, args)
    assert sharp.shape == blurry.shape == (1, 3, 16, 16) and kernel.shape == (1, 1, 5, 5)
    source = bench.load_photo(path, 16, 2)
    torch.testing.assert_close(scene, source)
    from diffusers_blind.ops.operators import BlurOperator

    expected = BlurOperator(padding="zeros")(source, kernel)[..., 2:18, 2:18]
    torch.testing.assert_close(blurry, torch.round(expected.clamp(0, 1) * 255) / 255)


def test_ceiling_with_the_true_scene_finds_the_kernel():
    """The masked M-step ceiling, given the scene the blur was applied to, recovers a noiseless kernel."""
    args = bench.parse_args(["--data_dir", ".", "--size", "48", "--kernel_sizes", "7", "7", "--sigma", "0"])
    path = Path(__file__).resolve().parents[1] / "examples" / "sharp.png"
    sharp, blurry, kernel, scene = bench.make_case(path, 0, args)
    from diffusers_blind import FastEMDeblurPipeline
    from diffusers_blind.metrics import mnc

    pipe = FastEMDeblurPipeline.from_pretrained(str(Path(__file__).resolve().parents[1] / "src" / "diffusers_blind" / "default_model"))
    for cg_iterations in (5, 0):  # masked and windowed M-steps
        ceiling = bench.mstep_ceiling(pipe, scene, blurry, 0.5, 16, 10, cg_iterations=cg_iterations)
        assert ceiling.shape[-1] == pipe.kernel_estimator.config.kernel_size
        assert float(mnc(ceiling, kernel)) > 0.99


def test_pipeline_seed_changes_the_diffusion_not_the_case(tmp_path):
    """``--pipeline_seed`` redraws the diffusion's noise while the blurred photograph and its kernel stay."""
    from diffusers_blind import FastEMDeblurPipeline, KernelEstimator

    photos = tmp_path / "photos"
    photos.mkdir()
    array = (smooth_images(1, 3, 64, 64, seed=3)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(array).save(photos / "p0.png")
    pipe = FastEMDeblurPipeline(tiny_unet(), tiny_ddpm(), KernelEstimator(kernel_size=7, regularization="none"))
    pipe.save_pretrained(tmp_path / "model")
    base = ["--data_dir", str(photos), "--model", str(tmp_path / "model"), "--size", "24", "--kernel_sizes", "5", "7",
            "--steps", "2", "--skip", "ceiling", "blind"]
    rows = {}
    for name, extra in (("same", []), ("again", ["--pipeline_seed", "0"]), ("other", ["--pipeline_seed", "5"])):
        assert bench.main(base + extra + ["--output", str(tmp_path / f"{name}.json")]) == 0
        rows[name] = json.loads((tmp_path / f"{name}.json").read_text())["rows"][0]
    assert rows["same"]["blurry_psnr"] == rows["other"]["blurry_psnr"] and rows["same"]["kernel_size"] == rows["other"]["kernel_size"]
    assert rows["same"]["oracle_psnr"] == rows["again"]["oracle_psnr"]
    assert rows["same"]["oracle_psnr"] != rows["other"]["oracle_psnr"]
