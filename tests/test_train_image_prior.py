"""Smoke test of scripts/train_image_prior.py: a few steps of a tiny UNet on random images."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_image_prior.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_image_prior", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_image_prior"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def script():
    return _load_script()


def _make_images(folder: Path, n: int = 4, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(20, 40, size=2)
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i}.png")
    # too small for a 16px crop: must be skipped, not crash
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")


def _argv(data: Path, out: Path, steps: int, extra: list[str] = ()) -> list[str]:
    return [
        "--train_data_dir", str(data), "--output_dir", str(out),
        "--block_out_channels", "8", "16", "--layers_per_block", "1",
        "--resolution", "16", "--batch_size", "2", "--max_train_steps", str(steps),
        "--checkpointing_steps", "2", "--log_every", "1", "--lr_warmup_steps", "2",
        "--sample_every", "0", "--num_sample_images", "4", "--sample_steps", "2",
        "--num_threads", "1", *extra,
    ]


def test_train_export_resume(script, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    data, out, exp = tmp_path / "data", tmp_path / "run", tmp_path / "default_model"
    _make_images(data)

    res = script.main(_argv(data, out, 3, ["--export_dir", str(exp)]))
    assert res["global_step"] == 3
    assert (out / "checkpoint-3").is_dir()
    assert (out / "checkpoint-2").is_dir()

    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in log)
    assert list((out / "samples").glob("final_step_*.png"))

    for root in (out / "export", exp):
        unet = UNet2DModel.from_pretrained(root / "unet")
        assert tuple(unet.config.block_out_channels) == (8, 16)
        sched = DDPMScheduler.from_pretrained(root / "scheduler")
        assert sched.config.timestep_spacing == "linspace"
        assert sched.config.prediction_type == "epsilon"
        assert sched.config.variance_type == "fixed_small"
        # fully convolutional: runs on a size it was not trained on
        with torch.no_grad():
            y = unet(torch.randn(1, 3, 24, 40), torch.tensor([10])).sample
        assert y.shape == (1, 3, 24, 40)

    # resume continues from the step count of the latest checkpoint
    res2 = script.main(_argv(data, out, 5, ["--resume", "latest"]))
    assert res2["global_step"] == 5
    assert (out / "checkpoint-5").is_dir()
    assert not (out / "checkpoint-2").exists()  # checkpoints_total_limit=2
    steps = [json.loads(line)["step"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    info = json.loads((out / "export" / "unet" / "training_info.json").read_text())
    assert info["step"] == 5


def test_a_resumed_run_equals_an_uninterrupted_one(script, tmp_path):
    """Crops, noise and timesteps are seeded by the step: stopping at a checkpoint and resuming reproduces
    the losses and the exported EMA weights of one straight run. An unreadable file is skipped with a note."""
    from safetensors.torch import load_file

    data = tmp_path / "data"
    _make_images(data)
    (data / "broken.png").write_text("not an image")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    script.main(_argv(data, straight, 5))
    script.main(_argv(data, resumed, 3))
    script.main(_argv(data, resumed, 5, ["--resume", "latest"]))

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "loss_log.jsonl").read_text().splitlines()]

    np.testing.assert_allclose(losses(resumed), losses(straight), rtol=1e-5)
    a = load_file(straight / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_crop_sampler_drops_flat_crops(script, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    flat = np.full((32, 64, 3), 128, np.uint8)
    flat[:, 32:] = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(flat).save(data / "half_flat.png")
    sampler = script.CropSampler(data, 16, min_std=0.05)
    batch = sampler.batch(8, torch.Generator().manual_seed(0))
    assert batch.shape == (8, 3, 16, 16)
    assert batch.min() >= -1 and batch.max() <= 1
    assert (batch.flatten(1).std(dim=1) > 0.1).all()


def test_init_from_starts_at_the_given_weights(script, tmp_path):
    """``--init_from``: the architecture and the weights come from the folder (a fine-tune), not the flags."""
    from diffusers import UNet2DModel

    data = tmp_path / "data"
    _make_images(data)
    torch.manual_seed(0)
    start = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                        up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    start.save_pretrained(tmp_path / "start")
    out = tmp_path / "run"
    # the flags ask for (8, 16): --init_from's (8, 8) config wins; no step is taken
    script.main(_argv(data, out, 0, ["--init_from", str(tmp_path / "start")]))
    exported = UNet2DModel.from_pretrained(out / "export" / "unet")
    assert tuple(exported.config.block_out_channels) == (8, 8)
    for name, value in start.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    # training moves the weights away from the start (the first step's warm-up learning rate is 0)
    script.main(_argv(data, tmp_path / "run1", 2, ["--init_from", str(tmp_path / "start")]))
    moved = UNet2DModel.from_pretrained(tmp_path / "run1" / "export" / "unet")
    assert any(not torch.equal(moved.state_dict()[n], v) for n, v in start.state_dict().items())


def test_loader_workers_give_the_batches_of_the_training_process(script, tmp_path):
    data = tmp_path / "data"
    _make_images(data, n=3)
    sampler = script.CropSampler(data, 16, min_std=0.0)
    args = script.parse_args(_argv(data, tmp_path / "out", steps=6, extra=["--batch_size", "3"]))
    direct = [sampler.batch(3, torch.Generator().manual_seed(args.seed * 1_000_003 + step)) for step in (2, 3, 4, 5)]
    for workers in (0, 2):
        args.num_workers = workers
        batches = list(script.step_crop_loader(sampler, args, start_step=2))  # a resumed run starts mid-way
        assert len(batches) == 4
        for got, want in zip(batches, direct):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def _tiny_unet(channels=(8, 8), out_channels=3):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=3, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=channels, down_block_types=("DownBlock2D",) * len(channels),
                       up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=4)


def test_distillation_target_mixes_the_teacher_and_the_noise(script):
    from accelerate import Accelerator

    torch.manual_seed(0)
    teacher = _tiny_unet().eval()
    noisy, noise = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        eps_teacher = teacher(noisy, t).sample
    acc = Accelerator()
    assert torch.allclose(script.distillation_target(teacher, noisy, t, noise, 1.0, acc), eps_teacher)
    assert torch.allclose(script.distillation_target(teacher, noisy, t, noise, 0.0, acc), noise)
    mixed = script.distillation_target(teacher, noisy, t, noise, 0.25, acc)
    assert torch.allclose(mixed, 0.25 * eps_teacher + 0.75 * noise, atol=1e-6)


def test_a_student_started_at_its_teacher_has_zero_distillation_loss(script, tmp_path):
    """``--teacher``: the loss is measured against the teacher's prediction, not the true noise."""
    data = tmp_path / "data"
    _make_images(data)
    torch.manual_seed(0)
    _tiny_unet().save_pretrained(tmp_path / "teacher")
    start = ["--init_from", str(tmp_path / "teacher")]
    script.main(_argv(data, tmp_path / "distil", 1, [*start, "--teacher", str(tmp_path / "teacher")]))
    script.main(_argv(data, tmp_path / "plain", 1, start))
    first = [json.loads((tmp_path / run / "loss_log.jsonl").read_text().splitlines()[0])["loss"]
             for run in ("distil", "plain")]
    assert first[0] < 1e-10 < 0.1 < first[1]
    info = json.loads((tmp_path / "distil" / "export" / "unet" / "training_info.json").read_text())
    assert info["teacher"] == str(tmp_path / "teacher") and info["teacher_weight"] == 1.0


def test_prune_from_starts_a_narrower_student_from_the_teachers_weights(script, tmp_path):
    """``--prune_from``: at the teacher's own widths the distillation loss starts at zero; narrower, it trains."""
    data = tmp_path / "data"
    _make_images(data)
    torch.manual_seed(0)
    _tiny_unet(channels=(8, 16)).save_pretrained(tmp_path / "teacher")
    common = ["--prune_from", str(tmp_path / "teacher"), "--teacher", str(tmp_path / "teacher")]

    def argv(run, steps, widths):
        args = _argv(data, tmp_path / run, steps, common)
        at = args.index("--block_out_channels")
        return args[: at + 1] + widths + args[at + 3:]

    script.main(argv("same", 1, ["8", "16"]))
    assert json.loads((tmp_path / "same" / "loss_log.jsonl").read_text().splitlines()[0])["loss"] < 1e-10
    script.main(argv("narrow", 2, ["4", "16"]))
    config = json.loads((tmp_path / "narrow" / "export" / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [4, 16]
    with pytest.raises(SystemExit, match="pass one"):
        script.main(_argv(data, tmp_path / "both", 1, [*common, "--init_from", str(tmp_path / "teacher")]))
    with pytest.raises(SystemExit, match="the last"):
        script.main(argv("deep", 1, ["8", "8"]))


def test_a_teacher_of_another_output_shape_is_refused(script, tmp_path):
    data = tmp_path / "data"
    _make_images(data)
    _tiny_unet(out_channels=6).save_pretrained(tmp_path / "teacher")
    with pytest.raises(SystemExit, match="out_channels"):
        script.main(_argv(data, tmp_path / "run", 1, ["--teacher", str(tmp_path / "teacher")]))
    with pytest.raises(SystemExit, match="config.json"):
        script.main(_argv(data, tmp_path / "run2", 1, ["--teacher", str(tmp_path)]))
    with pytest.raises(SystemExit, match="teacher_weight"):
        script.main(_argv(data, tmp_path / "run3", 1, ["--teacher", str(tmp_path / "teacher"), "--teacher_weight", "1.5"]))
    with pytest.raises(SystemExit, match="needs --teacher"):
        script.main(_argv(data, tmp_path / "run4", 1, ["--teacher_weight", "0.5"]))


def test_a_teacher_of_another_noise_schedule_is_refused(script, tmp_path):
    from diffusers import DDPMScheduler

    data = tmp_path / "data"
    _make_images(data)
    _tiny_unet().save_pretrained(tmp_path / "model" / "unet")
    DDPMScheduler(num_train_timesteps=500).save_pretrained(tmp_path / "model" / "scheduler")
    with pytest.raises(SystemExit, match="num_train_timesteps"):
        script.main(_argv(data, tmp_path / "run", 1, ["--teacher", str(tmp_path / "model" / "unet")]))
    script.build_scheduler(1000).save_pretrained(tmp_path / "model" / "scheduler")  # the script's own: accepted
    assert script.main(_argv(data, tmp_path / "run2", 1, ["--teacher", str(tmp_path / "model" / "unet")]))["global_step"] == 1


def test_a_distillation_is_not_resumed_without_its_teacher(script, tmp_path):
    data = tmp_path / "data"
    _make_images(data)
    torch.manual_seed(0)
    _tiny_unet(channels=(8, 16)).save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    script.main(_argv(data, out, 2, ["--teacher", str(tmp_path / "teacher")]))
    with pytest.raises(SystemExit, match="--teacher"):
        script.main(_argv(data, out, 4, ["--resume", "latest"]))
    _tiny_unet(channels=(8, 16)).save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="same objective"):
        script.main(_argv(data, out, 4, ["--resume", "latest", "--teacher", str(tmp_path / "other")]))
    res = script.main(_argv(data, out, 4, ["--resume", "latest", "--teacher", str(tmp_path / "teacher")]))
    assert res["global_step"] == 4
