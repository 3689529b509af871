"""Smoke tests of scripts/train_kernel_prior.py and scripts/train_tilt_prior.py: a few steps of tiny UNets."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernel_script():
    return _load("train_kernel_prior")


@pytest.fixture(scope="module")
def tilt_script():
    return _load("train_tilt_prior")


TINY = ["--block_out_channels", "8", "16", "--batch_size", "2", "--log_every", "1", "--checkpointing_steps", "2",
        "--lr_warmup_steps", "1", "--sample_every", "0", "--num_sample_images", "2", "--sample_steps", "2"]


def test_kernel_prior_trains_exports_and_resumes(kernel_script, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    out, pipe = tmp_path / "run", tmp_path / "pipe"
    argv = ["--output_dir", str(out), "--kernel_size", "16", "--export_dir", str(pipe), *TINY]
    result = kernel_script.main(argv + ["--max_train_steps", "3", "--variance", "learned_range"])
    assert result["global_step"] == 3
    unet = UNet2DModel.from_pretrained(pipe / "kernel_unet")
    assert unet.config.in_channels == 1 and unet.config.out_channels == 2 and unet.config.sample_size == 16
    assert DDPMScheduler.from_pretrained(out / "export" / "scheduler").config.variance_type == "learned_range"
    info = json.loads((pipe / "kernel_unet" / "training_info.json").read_text())
    assert info["step"] == 3 and info["kernel_size"] == 16
    assert list((out / "samples").glob("final_step_*.png"))
    resumed = kernel_script.main(argv + ["--max_train_steps", "5", "--variance", "learned_range", "--resume", "latest"])
    assert resumed["global_step"] == 5
    losses = [json.loads(line)["loss"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and all(np.isfinite(losses))


def test_kernel_data_are_model_range_images_of_sum_one_kernels(kernel_script):
    sampler = kernel_script.KernelSampler(32, (0.1, 1.0), 0.5, (0.5, 3.0))
    a, b = sampler.batch(6, np.random.default_rng(0)), sampler.batch(6, np.random.default_rng(0))
    torch.testing.assert_close(a, b)  # seeded
    assert a.shape == (6, 1, 32, 32) and a.amax(dim=(-2, -1)).allclose(torch.ones(6, 1)) and a.min() >= -1


def test_bad_kernel_size_is_rejected(kernel_script, tmp_path):
    with pytest.raises(SystemExit):
        kernel_script.parse_args(["--output_dir", str(tmp_path), "--kernel_size", "33"])


def test_tilt_prior_trains_and_exports_a_two_channel_unet(tilt_script, tmp_path):
    from diffusers import UNet2DModel

    out, pipe = tmp_path / "run", tmp_path / "pipe"
    result = tilt_script.main(["--output_dir", str(out), "--resolution", "16", "--export_dir", str(pipe),
                               "--max_train_steps", "2", *TINY])
    assert result["global_step"] == 2
    unet = UNet2DModel.from_pretrained(pipe / "tilt_unet")
    assert unet.config.in_channels == 2 and unet.config.out_channels == 2
    assert json.loads((pipe / "tilt_unet" / "training_info.json").read_text())["tilt_scale"] == 2.5
    fields = tilt_script.TiltSampler(16, 2.5, 2.5).batch(3, np.random.default_rng(0))
    assert fields.shape == (3, 2, 16, 16) and fields.abs().max() <= 1


def test_tilt_sampler_tiles_fields_drawn_at_the_source_size(tilt_script):
    """Tiles of 64-px fields keep the per-pixel spread of large maps; so do 32-px maps drawn directly (their
    patch count is raised, ops.tilt_map), though their seeded fields differ."""
    tiles = tilt_script.TiltSampler(32, 2.5, 2.5, source_size=64).batch(24, np.random.default_rng(0))
    direct = tilt_script.TiltSampler(32, 2.5, 2.5).batch(24, np.random.default_rng(0))
    assert tiles.shape == direct.shape == (24, 2, 32, 32)
    torch.testing.assert_close(tiles, tilt_script.TiltSampler(32, 2.5, 2.5, 64).batch(24, np.random.default_rng(0)))
    from diffusers_blind.ops import tilt_map

    large = torch.cat([tilt_map(256, 256, generator=i) for i in range(2)]) / 2.5
    assert abs(float(tiles.std()) / float(large.std()) - 1) < 0.15
    assert abs(float(direct.std()) / float(large.std()) - 1) < 0.15
    args = tilt_script.parse_args(["--output_dir", "x", "--resolution", "32"])
    assert args.source_size == 64
    with pytest.raises(SystemExit):
        tilt_script.parse_args(["--output_dir", "x", "--resolution", "32", "--source_size", "16"])


def test_tilt_prior_card_samples_at_several_sizes(tilt_script, tmp_path):
    """scripts/tilt_prior_card.py on a 2-step tilt prior: statistics and grids at the training size and larger."""
    out, pipe = tmp_path / "run", tmp_path / "pipe"
    tilt_script.main(["--output_dir", str(out), "--resolution", "8", "--export_dir", str(pipe),
                      "--max_train_steps", "2", *TINY])
    card = _load("tilt_prior_card")
    fields = torch.zeros(2, 2, 8, 8)
    fields[0, 0] = torch.arange(8.0).view(8, 1)  # a vertical ramp: equal horizontal neighbours, max 7 px
    stats = card.field_statistics(fields[:1])
    assert stats["max"][0] == 7 and stats["corr1"][0] == pytest.approx(1.0) and stats["over1px"][0] == pytest.approx(0.375)
    report = card.main(["--tilt_unet", str(out / "export" / "unet"), "--scheduler", str(out / "export" / "scheduler"),
                        "--output_dir", str(tmp_path / "card"), "--num_samples", "2", "--sizes", "8", "16",
                        "--steps", "2"])
    assert set(report["sizes"]) == {8, 16} and report["tilt_scale"] == 2.5
    for size in (8, 16):
        assert report["sizes"][size]["generator"]["std"][0] > 0.2  # tiles of 64-px fields
        assert (tmp_path / "card" / f"tilt_samples_{size}.png").is_file()
    assert json.loads((tmp_path / "card" / "tilt_stats.json").read_text())["tilt_scale"] == 2.5


def test_kernel_prior_init_from_starts_at_the_given_weights(kernel_script, tmp_path):
    """With a zero learning rate the weights never move, so the EMA export is exactly the initial model."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    kernel_script.main(["--output_dir", str(first), "--kernel_size", "16", *TINY, "--max_train_steps", "2", "--no_final_samples"])
    second = tmp_path / "second"
    kernel_script.main(["--output_dir", str(second), "--kernel_size", "16", *TINY, "--max_train_steps", "2",
                        "--no_final_samples", "--learning_rate", "0", "--init_from", str(first / "export" / "unet")])
    name = "diffusion_pytorch_model.safetensors"
    before, after = load_file(first / "export" / "unet" / name), load_file(second / "export" / "unet" / name)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="size mismatch"):
        kernel_script.main(["--output_dir", str(tmp_path / "third"), "--kernel_size", "16", *TINY, "--max_train_steps", "1",
                            "--no_final_samples", "--block_out_channels", "16", "32", "--init_from", str(first / "export" / "unet")])


def test_kernel_loader_workers_give_the_step_seeded_batches(kernel_script):
    sampler = kernel_script.KernelSampler(16, (0.1, 1.0), 0.5, (0.5, 2.0))
    args = kernel_script.parse_args(["--output_dir", "unused", "--kernel_size", "16", "--block_out_channels", "8", "16",
                                     "--batch_size", "3", "--max_train_steps", "5", "--seed", "7"])
    direct = [sampler.batch(3, np.random.default_rng([7, step])) for step in (1, 2, 3, 4)]
    for workers in (0, 2):
        args.num_workers = workers
        batches = list(kernel_script.step_batch_loader(sampler, args, start_step=1))
        assert len(batches) == 4
        for got, want in zip(batches, direct):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
