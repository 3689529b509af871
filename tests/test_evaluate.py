"""End-to-end tests of the evaluation (``scripts/evaluate.py`` → ``diffusers_blind.evaluation``; CPU, offline, tiny model).

Subprocess runs: one single-process run, one interrupted run (``--stop_after``) and its resumption with
``accelerate launch`` on 2 CPU processes; the resumed multi-process results must equal the
single-process ones. The rest runs the script's ``main`` in-process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evaluate.py"
METHODS = ["fastem-pigdm", "identity", "wiener-known-kernel"]
DETERMINISTIC = {"identity", "wiener-known-kernel"}
METRICS = ["psnr", "ssim", "gmsd", "sharpness", "kernel_mse", "mnc", "reblur_per_element"]


from diffusers_blind.baselines import wiener_deconvolution  # noqa: E402
from diffusers_blind.evaluation import degradations, figures, runner  # noqa: E402


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusers_blind import FastEMDeblurPipeline, KernelEstimator

    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    unet = UNet2DModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16, in_channels=3,
        out_channels=3, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, variance_type="fixed_small",
                              timestep_spacing="linspace")
    pipe = FastEMDeblurPipeline(unet=unet, scheduler=scheduler, kernel_estimator=KernelEstimator(kernel_size=5, num_iterations=2))
    pipe.save_pretrained(root / "model")

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:28, 0:30] / 28.0
    for i in range(4):  # random smooth colour patterns, larger than the 24x24 crop
        channels = [0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * cols + rng.uniform(0.5, 2) * rows) + rng.uniform(0, 6))
                    for _ in range(3)]
        Image.fromarray((np.stack(channels, -1) * 255).round().astype(np.uint8)).save(images / f"img{i}.png")
    Image.fromarray(np.full((10, 12, 3), 128, np.uint8)).save(images / "small.png")  # skipped at --resolution 24
    return root


@pytest.fixture()
def hf_env(fixture_dir, monkeypatch):
    env = {"HF_DATASETS_CACHE": str(fixture_dir / "hf_cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}


def common_args(fixture_dir, output_dir, methods=METHODS):
    return ["--data_dir", str(fixture_dir / "images"), "--resolution", "24", "--kernel_size", "5", "--steps", "2",
            "--sigma", "10", "--methods", *methods, "--model", str(fixture_dir / "model"), "--output_dir", str(output_dir),
            "--num_grid", "2"]


def run(command, env, expect=0):
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records_by_key(output_dir):
    records = [json.loads(line) for line in (Path(output_dir) / "results.jsonl").read_text().splitlines()]
    keys = [(r["image_index"], r["method"], r["sigma"]) for r in records]
    assert len(keys) == len(set(keys)), "a job is recorded twice"
    return dict(zip(keys, records))


def assert_same_results(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for metric in METRICS:
            va, vb = a[key][metric], b[key][metric]
            if va is None:
                assert vb is None
            elif key[1] in DETERMINISTIC:
                assert vb == pytest.approx(va, abs=1e-5), (key, metric)
            else:  # diffusion: same per-image seed; only float summation order may differ between thread counts
                assert vb == pytest.approx(va, rel=1e-4, abs=1e-5), (key, metric)


@pytest.fixture(scope="module")
def single_run(fixture_dir, tmp_path_factory):
    env = {**os.environ, "HF_DATASETS_CACHE": str(fixture_dir / "hf_cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    output_dir = tmp_path_factory.mktemp("single")
    result = run([sys.executable, str(SCRIPT), *common_args(fixture_dir, output_dir)], env)
    return output_dir, result


def test_single_process_outputs(single_run):
    output_dir, result = single_run
    assert "Skipping 1 image(s) smaller than 24x24" in result.stdout
    records = records_by_key(output_dir)
    assert len(records) == 4 * len(METHODS)  # 4 usable images x 1 sigma x 3 methods
    for (index, method, sigma), record in records.items():
        assert sigma == 10.0 and record["resolution"] == [24, 24] and record["time_s"] >= 0
        assert np.isfinite(record["psnr"]) and -1 <= record["ssim"] <= 1
        assert (record["kernel_mse"] is None) == (method == "wiener-known-kernel")  # true kernel: not scored
        if record["mnc"] is not None:
            assert 0 < record["mnc"] <= 1 + 1e-9
    # the Wiener filter with the true kernel beats doing nothing on these smooth images
    wiener = np.mean([r["psnr"] for k, r in records.items() if k[1] == "wiener-known-kernel"])
    identity = np.mean([r["psnr"] for k, r in records.items() if k[1] == "identity"])
    assert wiener > identity
    for name in ("summary.md", "summary.csv", "grid.png", "perception_distortion.png", "config.json"):
        assert (output_dir / name).is_file(), name
    assert not list(output_dir.glob("results.rank*.jsonl"))
    summary = (output_dir / "summary.md").read_text()
    for method in METHODS:
        assert f"| {method} | 10 | 4 |" in summary
    csv_header = (output_dir / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"method", "sigma", "n", "psnr_mean", "psnr_std", "mnc_mean", "time_s_mean"} <= set(csv_header)
    grid = Image.open(output_dir / "grid.png")
    assert grid.height > grid.width / 8  # two image rows


def test_interrupted_run_resumes_on_two_processes(single_run, fixture_dir, tmp_path, hf_env):
    output_dir = tmp_path / "resumed"
    args = common_args(fixture_dir, output_dir)
    with pytest.raises(SystemExit) as stopped:  # the test hook stops like a kill after 2 jobs
        runner.main([*args, "--stop_after", "2"])
    assert stopped.value.code == 3
    lines = (output_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first_two = [json.loads(line) for line in lines]
    with open(output_dir / "results.jsonl", "a") as handle:  # a kill in the middle of a write
        handle.write('{"image_index": 3, "method": "identity", "sig')
    with pytest.raises(SystemExit):  # one more job, appended after the broken line without being glued to it
        runner.main([*args, "--stop_after", "1"])
    valid = [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines() if line.endswith("}")]
    assert len(valid) == 3 and valid[:2] == first_two
    done_before = valid

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    result = run([*launch, str(SCRIPT), *args], hf_env)
    assert "3 already done, 9 to run on 2 process(es)" in result.stdout
    resumed = records_by_key(output_dir)
    assert len(resumed) == 4 * len(METHODS)
    assert {r["process"] for r in resumed.values()} == {0, 1}
    for record in done_before:  # kept as they were, not recomputed
        assert resumed[(record["image_index"], record["method"], record["sigma"])] == record
    assert not list(output_dir.glob("results.rank*.jsonl"))
    assert_same_results(records_by_key(single_run[0]), resumed)

    # a third run has nothing to do and keeps every job exactly once
    assert runner.main(args) == 0
    assert records_by_key(output_dir).keys() == resumed.keys()


def test_refuses_to_mix_settings(single_run, fixture_dir, hf_env):
    output_dir, _ = single_run
    args = common_args(fixture_dir, output_dir)
    args[args.index("--kernel_size") + 1] = "3"
    with pytest.raises(SystemExit, match="kernel_size"):
        runner.main(args)


def test_degradation_is_a_pure_function_of_seed_and_index():
    args = runner.parse_args(["--data_dir", ".", "--output_dir", "x", "--kernel_size", "7", "--methods", "identity"])
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    first = [degradations.make_kernel(args, i, None)[0] for i in (0, 1, 2)]
    again = [degradations.make_kernel(args, i, None)[0] for i in (2, 0, 1)]  # another order, another process
    assert torch.equal(first[0], again[1]) and torch.equal(first[2], again[0])
    assert not torch.equal(first[0], first[1])
    torch.manual_seed(123)  # the global RNG plays no part
    y1 = degradations.degrade(x, first[0], 10.0, args, 0)
    torch.manual_seed(456)
    assert torch.equal(y1, degradations.degrade(x, first[0], 10.0, args, 0))
    assert not torch.equal(y1, degradations.degrade(x, first[0], 10.0, args, 1))
    args.seed = 1
    assert not torch.equal(first[0], degradations.make_kernel(args, 0, None)[0])


def test_user_kernels_reflect_blur_and_padding(fixture_dir, tmp_path, hf_env):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    line = np.zeros((5, 5))
    line[2, 1:4] = 1.0
    np.save(kernels / "a_line.npy", line)
    Image.fromarray(np.pad(np.full((1, 3), 255, np.uint8), 1)).save(kernels / "b_bar.png")  # 3 rows x 5 columns
    output_dir = tmp_path / "out"
    args = ["--data_dir", str(fixture_dir / "images"), "--resolution", "26", "--small_images", "pad",
            "--kernel", str(kernels), "--blur_mode", "reflect", "--sigma", "0", "--limit", "5",
            "--methods", "identity", "wiener-known-kernel", "--output_dir", str(output_dir), "--num_grid", "1"]
    assert runner.main(args) == 0
    records = records_by_key(output_dir)
    assert len(records) == 5 * 2  # the 10x12 image is padded, not skipped
    names = {r["image_index"]: r["kernel"] for r in records.values()}
    assert {r["kernel_size"] for r in records.values()} == {5}  # the true kernels' size, whatever --kernel_size
    assert names == {0: "a_line.npy", 1: "b_bar.png", 2: "a_line.npy", 3: "b_bar.png", 4: "a_line.npy"}
    assert all(r["resolution"] == [26, 26] for r in records.values())
    # a known kernel and sigma = 0: the re-blur residual of the Wiener estimate is small
    wiener = [r for k, r in records.items() if k[1] == "wiener-known-kernel" and k[2] == 0.0]
    assert all(abs(r["reblur_per_element"]) < 1e-3 for r in wiener)


def test_wiener_deconvolution_recovers_a_blurred_image():
    from diffusers_blind import metrics
    from diffusers_blind.ops import fft_blur, gaussian_kernel

    coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.interpolate(coarse, size=(48, 48), mode="bicubic", align_corners=False).clamp(0, 1)
    kernel = gaussian_kernel(9, 2.0)
    y = fft_blur(x, kernel) + 2 / 255 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    restored = wiener_deconvolution(y, kernel, 2 / 255, "circular")
    assert metrics.psnr(restored, x).item() > metrics.psnr(y, x).item() + 2


def test_wiener_on_valid_data_solves_for_the_unseen_margin():
    """A photograph's blur (valid) deconvolved with a reflect boundary rings; the valid model does not."""
    from diffusers_blind import metrics
    from diffusers_blind.ops import motion_kernel

    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 10, 10, generator=generator)
    large = torch.nn.functional.interpolate(coarse, size=(24, 24), mode="bicubic", align_corners=False).clamp(0, 1)
    kernel = motion_kernel(5, 0.5, np.random.default_rng(1))
    y = degradations.blur(large, kernel, "valid") + 2 / 255 * torch.randn(1, 3, 20, 20, generator=generator)
    truth = large[..., 2:22, 2:22]
    valid = metrics.psnr(wiener_deconvolution(y, kernel, 2 / 255, "valid"), truth).item()
    reflect = metrics.psnr(wiener_deconvolution(y, kernel, 2 / 255, "reflect"), truth).item()
    assert valid > reflect + 3 and valid > metrics.psnr(y.clamp(0, 1), truth).item() + 2


def test_pil_scatter_fallback(tmp_path):
    path = tmp_path / "plot.png"
    figures._pil_scatter([(20.0, 0.3, "a sigma=5"), (25.0, 0.1, "b sigma=5")], "PSNR", "LPIPS", path)
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape == (520, 720) and image.min() < 128  # something was drawn


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_perception_distortion_panels_one_panel_per_sigma(tmp_path, monkeypatch, with_matplotlib):
    import builtins

    if with_matplotlib:
        pytest.importorskip("matplotlib")  # the optional `eval` extra
    else:
        real_import = builtins.__import__

        def no_matplotlib(name, *args, **kwargs):
            if name.startswith("matplotlib"):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    summary = {"blurry": {"5": {"psnr": 20.0, "niqe": 14.0}, "10": {"psnr": 19.0, "niqe": 15.0}},
               "predictor": {"5": {"psnr": 23.0, "niqe": 9.0}, "10": {"psnr": 22.0, "niqe": 8.0}},
               "dvsr 100x1": {"5": {"psnr": 22.8, "niqe": 8.5}, "10": {"psnr": 21.9, "niqe": 7.0}}}
    one = figures.perception_distortion_panels({row: {"5": v["5"]} for row, v in summary.items()}, tmp_path / "one.png")
    two = figures.perception_distortion_panels(summary, tmp_path / "two.png")
    width_one, width_two = Image.open(one).size[0], Image.open(two).size[0]
    assert width_two > 1.8 * width_one  # a second panel for the second σ
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # no stray panel files
    assert np.asarray(Image.open(two).convert("L")).min() < 128  # something was drawn


# ---------------------------------------------------------------------------- --blur valid, config.json
def test_valid_blur_is_a_linear_convolution_without_wrap_around():
    from diffusers_blind.ops import fft_blur

    generator = torch.Generator().manual_seed(0)
    large = torch.rand(1, 3, 20, 23, generator=generator, dtype=torch.float64)
    kernel = torch.rand(1, 1, 5, 4, generator=generator, dtype=torch.float64)
    kernel /= kernel.sum()
    y = degradations.blur(large, kernel, "valid")
    assert y.shape == (1, 3, 16, 20)
    kh, kw = kernel.shape[-2:]
    direct = sum(kernel[0, 0, a, b] * large[..., kh - 1 - a : kh - 1 - a + 16, kw - 1 - b : kw - 1 - b + 20]
                 for a in range(kh) for b in range(kw))  # y[i] = Σ_m k[m] x[i + k - 1 - m]
    torch.testing.assert_close(y, direct)
    # the same numbers as the circular blur away from the border, where the circular one wraps around
    circular = fft_blur(large, kernel)[..., (kh - 1) // 2 : 20 - kh // 2, (kw - 1) // 2 : 23 - kw // 2]
    torch.testing.assert_close(y, circular)
    centre = large[..., (kh - 1) // 2 : (kh - 1) // 2 + 16, (kw - 1) // 2 : (kw - 1) // 2 + 20]
    wrapped = fft_blur(centre, kernel)  # --blur circular on the same truth: the first row mixes in the last
    assert not torch.allclose(wrapped[..., 0, :], y[..., 0, :], atol=1e-3)
    torch.testing.assert_close(wrapped[..., kh // 2 : 16 - kh // 2, kw // 2 : 20 - kw // 2],
                               y[..., kh // 2 : 16 - kh // 2, kw // 2 : 20 - kw // 2])


def test_valid_scene_crops_the_same_truth_with_a_kernel_margin(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (30, 31, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    dataset = [{"image": {"path": str(tmp_path / "a.png"), "bytes": None}}]
    kernel = torch.ones(1, 1, 5, 4) / 20
    circular = runner.parse_args(["--data_dir", ".", "--output_dir", "x", "--resolution", "16", "--kernel_size", "5",
                                  "--methods", "identity"])
    valid = runner.parse_args(["--data_dir", ".", "--output_dir", "x", "--resolution", "16", "--kernel_size", "5",
                               "--blur", "valid", "--methods", "identity"])
    truth, source = degradations.load_scene(dataset, "image", 0, circular, kernel)
    assert torch.equal(truth, source) and truth.shape == (1, 3, 16, 16)
    truth_v, source_v = degradations.load_scene(dataset, "image", 0, valid, kernel)
    assert torch.equal(truth_v, truth) and source_v.shape == (1, 3, 20, 19)
    assert torch.equal(source_v[..., 2:18, 1:17], truth)  # (kh - 1) // 2 rows above, (kw - 1) // 2 columns left
    y = degradations.degrade(source_v, kernel, 0.0, valid, 0)
    assert y.shape == truth.shape
    exact = degradations.reblur_scores(truth, kernel, y, 0.0, "valid")  # the truth explains y exactly
    assert abs(exact.per_element.item()) < 1e-12
    shifted = degradations.reblur_scores(truth.roll(1, -1), kernel, y, 0.0, "valid")
    assert shifted.per_element.item() > 1e-4


def test_valid_blur_end_to_end_and_summary(fixture_dir, tmp_path, hf_env):
    output_dir = tmp_path / "valid"
    args = ["--data_dir", str(fixture_dir / "images"), "--resolution", "20", "--kernel_size", "5", "--blur", "valid",
            "--sigma", "2", "--methods", "identity", "wiener-known-kernel", "--output_dir", str(output_dir),
            "--extra_metrics", "none", "--num_grid", "1"]
    assert runner.main(args) == 0
    records = records_by_key(output_dir)
    assert len(records) == 4 * 2 and all(r["blur_mode"] == "valid" for r in records.values())
    wiener = [r for k, r in records.items() if k[1] == "wiener-known-kernel"]
    assert all(abs(r["reblur_per_element"]) < 1e-3 for r in wiener)  # the estimate explains the measurement
    summary = (output_dir / "summary.md").read_text()
    assert "blur `valid` (linear blur of a larger crop" in summary
    assert "valid" in (output_dir / "summary.csv").read_text().splitlines()[1].split(",")
    assert json.loads((output_dir / "config.json").read_text())["blur_mode"] == "valid"


def test_empty_or_corrupt_config_json(fixture_dir, tmp_path, hf_env, capsys):
    output_dir = tmp_path / "cfg"
    output_dir.mkdir()
    (output_dir / "config.json").write_text("")  # killed during the first write, before any result
    args = ["--data_dir", str(fixture_dir / "images"), "--resolution", "24", "--kernel_size", "5", "--sigma", "5",
            "--methods", "identity", "--output_dir", str(output_dir), "--extra_metrics", "none", "--limit", "2"]
    assert runner.main(args) == 0
    assert "is empty" in capsys.readouterr().err
    assert json.loads((output_dir / "config.json").read_text())["kernel_size"] == 5
    (output_dir / "config.json").write_text('{"kernel_size": 5, "blur')  # cut short, with results present
    with pytest.raises(SystemExit, match="not valid JSON.*delete config.json.*--overwrite"):
        runner.main(args)
    assert not list(output_dir.glob(".config.json.*.tmp"))


def test_old_config_without_method_options_still_resumes(fixture_dir, tmp_path, hf_env):
    output_dir = tmp_path / "old"
    args = ["--data_dir", str(fixture_dir / "images"), "--resolution", "24", "--kernel_size", "5", "--sigma", "5",
            "--methods", "identity", "--output_dir", str(output_dir), "--extra_metrics", "none", "--limit", "2"]
    assert runner.main(args) == 0
    config = json.loads((output_dir / "config.json").read_text())
    config.pop("kernel_size", None)  # stands for a setting a newer method added
    (output_dir / "config.json").write_text(json.dumps(config))
    before = records_by_key(output_dir)
    assert runner.main(args) == 0
    assert records_by_key(output_dir) == before
    assert json.loads((output_dir / "config.json").read_text())["kernel_size"] == 5  # added back


def test_evaluation_input_errors_are_clear(fixture_dir, tmp_path, hf_env, capsys):
    with pytest.raises(SystemExit):
        runner.parse_args(["--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")])
    assert "is not a folder" in capsys.readouterr().err
    args = ["--data_dir", str(fixture_dir / "images"), "--resolution", "24", "--kernel_size", "5", "--limit", "1",
            "--methods", "fastem-pigdm", "--model", str(tmp_path / "no_model"), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="cannot load the pipeline of fastem-pigdm"):
        runner.main(args)


def test_fallbacks_are_recorded_and_counted(fixture_dir, tmp_path, hf_env, monkeypatch):
    """A blind run whose guard returned the input is named in its record and counted in the summary."""
    from diffusers_blind import methods

    def run(y, *, sigma, kernel, generator, pipeline, blur):
        return methods.MethodResult(image=y.clamp(0, 1), kernel=None, fallback=True, fit=9.5)

    methods.register_method(methods.Method("always-falls-back", run, returns_kernel=False))
    try:
        output_dir = tmp_path / "fb"
        args = ["--data_dir", str(fixture_dir / "images"), "--resolution", "24", "--kernel_size", "5", "--sigma", "5",
                "--methods", "identity", "always-falls-back", "--output_dir", str(output_dir),
                "--extra_metrics", "none", "--limit", "2"]
        assert runner.main(args) == 0
    finally:
        methods.unregister_method("always-falls-back")
    records = records_by_key(output_dir)
    assert {r["fallback"] for k, r in records.items() if k[1] == "always-falls-back"} == {True}
    assert {r["fit"] for k, r in records.items() if k[1] == "always-falls-back"} == {9.5}
    assert {r["fallback"] for k, r in records.items() if k[1] == "identity"} == {None}
    rows = {line.split(",")[0]: line.split(",") for line in (output_dir / "summary.csv").read_text().splitlines()}
    header = rows["method"]
    assert rows["always-falls-back"][header.index("fallbacks")] == "2"
    assert rows["identity"][header.index("fallbacks")] == "0"
    assert "| always-falls-back | 5 | 2 | 2 |" in (output_dir / "summary.md").read_text()


def test_folders_without_results_and_subsets_of_methods(fixture_dir, tmp_path, hf_env, capsys):
    base = ["--data_dir", str(fixture_dir / "images"), "--resolution", "24", "--kernel_size", "5", "--sigma", "5",
            "--extra_metrics", "none", "--limit", "2"]
    # a command that failed before its first result does not block the corrected one
    output_dir = tmp_path / "retry"
    with pytest.raises(SystemExit, match="cannot load the pipeline"):
        runner.main([*base, "--methods", "fastem-pigdm", "--model", str(tmp_path / "nope"), "--output_dir", str(output_dir)])
    assert runner.main([*base, "--methods", "identity", "--kernel_size", "3", "--output_dir", str(output_dir)]) == 0
    assert "no result yet" in capsys.readouterr().err
    # a later command with a subset of the methods (no model) resumes the folder of a run that used one
    output_dir = tmp_path / "subset"
    model = ["--model", str(fixture_dir / "model"), "--steps", "2"]
    assert runner.main([*base, "--methods", "identity", "fastem-pigdm", *model, "--output_dir", str(output_dir)]) == 0
    before = records_by_key(output_dir)
    assert runner.main([*base, "--methods", "identity", "--output_dir", str(output_dir)]) == 0
    assert records_by_key(output_dir) == before
    assert json.loads((output_dir / "config.json").read_text())["model"] == str(fixture_dir / "model")
    # the user's own files in a folder that is not an evaluation's are never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("MY NOTES")
    with pytest.raises(SystemExit, match="no config.json but holds files"):
        runner.main([*base, "--methods", "identity", "--output_dir", str(mine)])
    assert (mine / "summary.md").read_text() == "MY NOTES"


@pytest.mark.parametrize("make, message", [
    (lambda tmp: ["--data_dir", str(tmp)], "holds no images"),
    (lambda tmp: ["--output_dir", str(tmp / "file")], "is a file"),
    (lambda tmp: ["--resolution", "16", "--kernel_size", "33"], "larger than --resolution"),
])
def test_more_argument_errors(fixture_dir, tmp_path, hf_env, capsys, make, message):
    (tmp_path / "file").write_text("x")
    args = {"--data_dir": str(fixture_dir / "images"), "--output_dir": str(tmp_path / "o"), "--methods": "identity"}
    extra = make(tmp_path)
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    with pytest.raises(SystemExit):
        runner.parse_args([item for pair in args.items() for item in pair])
    assert message in capsys.readouterr().err


def test_a_changed_data_folder_is_refused_on_resume_and_unreadable_files_skipped(fixture_dir, tmp_path, hf_env, capsys):
    """Results are keyed by image position: when files added to the folder shift the positions, resuming
    would score one image twice and skip another, so it stops. An unreadable file is named and skipped.
    A method run at its default step count records that count."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for name in ("img1.png", "img2.png"):
        shutil.copy(fixture_dir / "images" / name, data / name)
    output_dir = tmp_path / "out"
    args = ["--data_dir", str(data), "--resolution", "24", "--kernel_size", "5", "--sigma", "5",
            "--methods", "identity", "fastem-pigdm", "--model", str(fixture_dir / "model"), "--guard", "off",
            "--output_dir", str(output_dir), "--extra_metrics", "none", "--num_grid", "0"]
    assert runner.main(args) == 0
    records = records_by_key(output_dir)
    assert {r["steps"] for k, r in records.items() if k[1] == "fastem-pigdm"} == {50}  # the default that ran
    shutil.copy(fixture_dir / "images" / "img0.png", data / "a0.png")  # sorts first: every index moves
    with pytest.raises(SystemExit, match="image 0 was 'img1' and is now 'a0'"):
        runner.main(args)
    (data / "a0.png").unlink()
    (data / "zz_broken.png").write_text("not an image")  # sorts last: the positions of the others hold
    assert runner.main(args) == 0
    assert "Skipping 1 unreadable image(s): zz_broken" in capsys.readouterr().out
    assert len(records_by_key(output_dir)) == 4
