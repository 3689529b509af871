"""Smoke tests of scripts/train_dvsr.py: a few steps of tiny models on tiny synthetic photographs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("train_dvsr", SCRIPTS / "train_dvsr.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_dvsr"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def photos(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        smooth = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((5, 5, 1))).astype(np.uint8)  # 40×40 blocks
        Image.fromarray(smooth).save(folder / f"photo_{i}.png")
    return folder


TINY = ["--resolution", "16", "--max_kernel_size", "5", "--batch_size", "2", "--num_threads", "1",
        "--predictor_channels", "8", "16", "--denoiser_channels", "8", "16", "--denoiser_norm_groups", "4",
        "--num_train_timesteps", "50", "--log_every", "1", "--checkpointing_steps", "0", "--export_every_minutes", "0",
        "--num_validation", "2", "--lr_warmup_steps", "1", "--min_crop_std", "0"]


def _state(folder: Path, component: str) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / component / "diffusion_pytorch_model.safetensors")


def test_trains_exports_and_fine_tunes_the_denoiser_on_a_frozen_predictor(script, photos, tmp_path):
    first = tmp_path / "first"
    result = script.main(["--train_data_dir", str(photos), "--output_dir", str(first), "--max_train_steps", "2", *TINY])
    assert result["global_step"] == 2
    export = first / "export"
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == "StochasticRefinementDeblurPipeline"
    losses = [json.loads(line)["loss"] for line in (first / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))

    second = tmp_path / "second"
    script.main(["--train_data_dir", str(photos), "--output_dir", str(second), "--max_train_steps", "2", *TINY,
                 "--init_from", str(export), "--mode", "denoiser", "--loss_norm", "l2", "--learning_rate", "1e-2"])
    g0, g1 = _state(export, "predictor"), _state(second / "export", "predictor")
    assert all(torch.equal(g0[k], g1[k]) for k in g0)  # frozen: the predictor is exactly the one it started from
    f0, f1 = _state(export, "denoiser"), _state(second / "export", "denoiser")
    assert any(not torch.equal(f0[k], f1[k]) for k in f0)  # the denoiser was trained
    args = json.loads((second / "args.json").read_text())
    assert args["mode"] == "denoiser" and args["loss_norm"] == "l2"


def test_init_from_a_folder_with_other_channels_fails(script, photos, tmp_path):
    first = tmp_path / "first"
    script.main(["--train_data_dir", str(photos), "--output_dir", str(first), "--max_train_steps", "1", *TINY])
    wider = [*TINY]
    wider[wider.index("--denoiser_channels") + 1 : wider.index("--denoiser_channels") + 3] = ["16", "32"]
    with pytest.raises(RuntimeError, match="size mismatch"):
        script.main(["--train_data_dir", str(photos), "--output_dir", str(tmp_path / "second"), "--max_train_steps", "1",
                     *wider, "--init_from", str(first / "export")])


def test_export_dir_with_other_files_is_refused_before_training(script, photos, tmp_path):
    """An export replaces its folder: a folder holding anything but an earlier export is refused up front,
    and an earlier export is replaced."""
    mine = tmp_path / "mymodels"
    (mine / "other_model").mkdir(parents=True)
    (mine / "precious.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not an earlier export"):
        script.main(["--train_data_dir", str(photos), "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1",
                     *TINY, "--export_dir", str(mine)])
    assert (mine / "precious.txt").read_text() == "keep" and (mine / "other_model").is_dir()
    assert not (tmp_path / "run" / "loss_log.jsonl").exists()  # refused before any training step
    export = tmp_path / "export_here"
    for run in ("run1", "run2"):  # the second run replaces the first run's export
        script.main(["--train_data_dir", str(photos), "--output_dir", str(tmp_path / run), "--max_train_steps", "1",
                     *TINY, "--export_dir", str(export)])
        assert json.loads((export / "model_index.json").read_text())["_class_name"] == "StochasticRefinementDeblurPipeline"


def test_real_pairs_that_cannot_give_a_crop_are_refused_not_looped_on(script, tmp_path):
    pairs = tmp_path / "pairs" / "scene"
    for kind in ("blur", "sharp"):
        (pairs / kind).mkdir(parents=True)
        Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(pairs / kind / "0.png")  # smaller than the 16 px crop
    with pytest.raises(SystemExit, match="none of the 1 pairs"):
        script.main(["--pairs_dir", str(tmp_path / "pairs"), "--output_dir", str(tmp_path / "run"),
                     "--max_train_steps", "1", *TINY])


def test_an_interrupted_export_does_not_block_the_next_run(script, tmp_path):
    """An export killed while writing its scratch folder leaves ``export.tmp`` without an index: the script's
    own leftover, replaced by the next export, not a folder of the user's."""
    partial = tmp_path / "run" / "export.tmp" / "predictor"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    script.check_export_folder(tmp_path / "run" / "export")  # no SystemExit
    (tmp_path / "run" / "export.tmp" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an earlier export"):
        script.check_export_folder(tmp_path / "run" / "export")
