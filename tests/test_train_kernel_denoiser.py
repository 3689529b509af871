"""Tests of scripts/train_kernel_denoiser.py (tiny CPU runs) and of the shipped kernel estimator."""

import csv
import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch

import diffusers_blind
from diffusers_blind import KernelEstimator
from diffusers_blind.ops import dirac_kernel, fft_blur, motion_kernel


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_kernel_denoiser.py"
SHIPPED = Path(diffusers_blind.DEFAULT_MODEL) / "kernel_estimator"


@pytest.fixture(scope="module")
def train_module():
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} not found (tests run from a source checkout)")
    spec = importlib.util.spec_from_file_location("train_kernel_denoiser", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(output_dir, pool, max_steps, *extra):
    return [
        "--kernel_size", "9", "--output_dir", str(output_dir), "--pool_cache", str(pool),
        "--num_kernels", "12", "--num_val_kernels", "4", "--batch_size", "8",
        "--max_steps", str(max_steps), "--val_every", "2", "--checkpoint_every", "2", "--log_every", "2",
        "--lambda_", "0.5", "--no_plot", "--num_threads", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(train_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    result = train_module.main(tiny_args(root / "run", root / "pool.pt", 4))
    return root, result


def test_kernel_pool_mixes_motion_shake_and_gaussian_kernels(train_module):
    from diffusers_blind.ops import ShakeKernelGenerator, center_kernel

    args = train_module.parse_args(["--output_dir", "unused", "--kernel_size", "9", "--motion_fraction", "0.5",
                                    "--shake_fraction", "0.25"])
    pool = train_module.make_kernels(9, 8, 0, args)
    assert pool.shape == (8, 1, 9, 9)
    torch.testing.assert_close(pool.sum(dim=(-2, -1)), torch.ones(8, 1))
    shake = center_kernel(ShakeKernelGenerator(9)(2, 2)).float()  # the pool's shake part is seeded by seed + 2
    torch.testing.assert_close(pool[4:6], shake)


def test_export_loads_with_right_config(tiny_run):
    root, result = tiny_run
    assert result["step"] == 4
    estimator = KernelEstimator.from_pretrained(result["export_dir"])
    assert estimator.config.kernel_size == 9
    assert estimator.config.lambda_ == 0.5
    assert estimator.config.regularization == "pnp"
    assert estimator.config.denoiser_input_scale == pytest.approx(81 / 4)
    denoiser = diffusers_blind.KernelDenoiser.from_pretrained(root / "run" / "denoiser")
    for (name, a), b in zip(estimator.denoiser.state_dict().items(), denoiser.state_dict().values()):
        assert torch.equal(a, b), name
    # the exported estimator runs
    x = torch.rand(1, 3, 16, 16)
    k = estimator(fft_blur(x, dirac_kernel(9)), x, 0.01)
    assert k.shape == (1, 1, 9, 9) and torch.isfinite(k).all()
    assert k.sum().item() == pytest.approx(1.0, abs=1e-5)
    # validation curve: one row per noise level per validation step (2 and 4), finite
    with open(root / "run" / "validation.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["step"]) for r in rows}) == [2, 4]
    assert all(math.isfinite(float(r["mse_denoised"])) for r in rows)
    assert (root / "pool.pt").exists()


def test_resume_reproduces_uninterrupted_run(train_module, tiny_run):
    root, _ = tiny_run
    straight = train_module.main(tiny_args(root / "straight", root / "pool.pt", 6))
    # interrupted run: copy the step-4 checkpoint of the 6-step run, then resume to 6 steps
    resumed_dir = root / "resumed"
    shutil.copytree(root / "straight" / "checkpoints" / "checkpoint-4", resumed_dir / "checkpoints" / "checkpoint-4")
    resumed = train_module.main(tiny_args(resumed_dir, root / "pool.pt", 6, "--resume", "latest"))
    assert resumed["step"] == 6
    assert [r["step"] for r in resumed["history"]["train"]] == [2, 4, 6]
    a = KernelEstimator.from_pretrained(straight["export_dir"]).denoiser.state_dict()
    b = KernelEstimator.from_pretrained(resumed["export_dir"]).denoiser.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_a_longer_resumed_run_follows_the_longer_schedule(train_module, tiny_run):
    """Resuming a finished 4-step run to 8 steps: the learning rate follows the 8-step cosine from step 4 on,
    and a new run into a folder with checkpoints needs --resume."""
    import math

    root, _ = tiny_run
    longer_dir = root / "longer"
    shutil.copytree(root / "run" / "checkpoints", longer_dir / "checkpoints")
    train_module.main(tiny_args(longer_dir, root / "pool.pt", 8, "--resume", "latest"))
    state = torch.load(longer_dir / "checkpoints" / "checkpoint-8" / "optimizer.bin", weights_only=False)
    lr = state["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-4)  # lr_min at the end of the 8-step curve
    state6 = torch.load(longer_dir / "checkpoints" / "checkpoint-6" / "optimizer.bin", weights_only=False)
    expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 6 / 8))
    assert state6["param_groups"][0]["lr"] == pytest.approx(expected)
    with pytest.raises(SystemExit, match="--resume latest"):
        train_module.main(tiny_args(longer_dir, root / "pool.pt", 2))


def synthetic_photo(size=128, seed=0):
    """A smooth-plus-edges test image (random disks and rectangles over low-passed noise), (1, 3, s, s)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, size // 8, size // 8, generator=gen)
    image = 0.5 + 0.15 * torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    rr, cc = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(12):
        r, c, rad = (torch.rand(3, generator=gen) * torch.tensor([size, size, size / 5])).tolist()
        color = torch.rand(3, 1, 1, generator=gen)
        mask = ((rr - r) ** 2 + (cc - c) ** 2 < (rad + 3) ** 2) if torch.rand(1, generator=gen) < 0.5 else (
            ((rr - r).abs() < rad + 2) & ((cc - c).abs() < rad / 2 + 2)
        )
        image[0] = torch.where(mask, color, image[0])
    return image.clamp(0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["kernel_estimator", "kernel_estimator_64"])
def test_shipped_estimator_recovers_motion_kernel(folder):
    shipped = SHIPPED.parent / folder
    if not (shipped / "config.json").exists():
        pytest.skip(f"no shipped kernel estimator at {shipped} (train one with scripts/train_kernel_denoiser.py)")
    estimator = KernelEstimator.from_pretrained(shipped)
    assert estimator.config.regularization == "pnp"
    size = estimator.config.kernel_size
    torch.manual_seed(0)
    sharp = synthetic_photo(128 if size <= 33 else 192).double()
    truth = motion_kernel(size, 0.5, generator=3).double()
    sigma = 2.0 / 255
    blurred = fft_blur(sharp, truth) + sigma * torch.randn(sharp.shape, dtype=torch.float64)
    with torch.no_grad():
        estimate = estimator.double()(blurred, sharp, sigma)
    mse = (estimate - truth).square().mean().item()
    mse_dirac = (dirac_kernel(size, dtype=torch.float64) - truth).square().mean().item()
    assert estimate.shape == truth.shape
    assert mse < 0.01 * mse_dirac, (mse, mse_dirac)


def test_a_cached_pool_of_other_settings_is_regenerated(train_module, tmp_path):
    """The pool cache records the settings it was made with: other settings never reuse it."""
    from accelerate import Accelerator

    cache = tmp_path / "pool.pt"
    base = ["--kernel_size", "9", "--output_dir", str(tmp_path / "run"), "--pool_cache", str(cache),
            "--num_kernels", "6"]
    accelerator = Accelerator(cpu=True)
    motion = train_module.load_pool(train_module.parse_args([*base, "--motion_fraction", "1.0"]), accelerator)
    again = train_module.load_pool(train_module.parse_args([*base, "--motion_fraction", "1.0"]), accelerator)
    torch.testing.assert_close(again, motion)  # the same settings reuse it
    gaussian = train_module.load_pool(train_module.parse_args([*base, "--motion_fraction", "0.0"]), accelerator)
    expected = train_module.make_kernels(9, 6, 0, train_module.parse_args([*base, "--motion_fraction", "0.0"]))
    torch.testing.assert_close(gaussian, expected)
    assert not torch.allclose(gaussian, motion)
    torch.save(motion, cache)  # a cache of an older version (no settings): regenerated too
    torch.testing.assert_close(
        train_module.load_pool(train_module.parse_args([*base, "--motion_fraction", "0.0"]), accelerator), expected)
