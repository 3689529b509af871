"""The methods registry: a method added with one ``register_method`` call runs from the command line and in
the evaluation, without any edit of ``cli.py`` or ``diffusers_blind.evaluation``."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_blind import methods
from diffusers_blind.cli import build_parser, main
from diffusers_blind.evaluation import runner
from diffusers_blind.methods import METHODS, Method, MethodResult, Option, register_method, unregister_method


def gamma_run(y, *, sigma, kernel, generator, pipeline, blur, gamma_exponent):
    """A dummy 'restoration' that estimates no kernel."""
    assert pipeline is None and kernel is None and isinstance(generator, torch.Generator)
    return MethodResult(image=y.clamp(0, 1) ** gamma_exponent, kernel=None)


@pytest.fixture
def gamma_method():
    method = register_method(Method(
        "dummy-gamma", gamma_run, "a dummy method for the tests (gamma curve, no kernel)", returns_kernel=False,
        options=(Option("gamma_exponent", float, 1.0, "exponent of the dummy gamma curve"),),
    ))
    yield method
    unregister_method("dummy-gamma")


def test_builtin_methods_are_registered():
    assert {"fastem-pigdm", "fastem-dps", "fastem-diffpir", "diffusion-em", "pigdm-known-kernel", "dps-known-kernel",
            "diffpir-known-kernel", "wiener-known-kernel", "identity"} <= set(METHODS)
    assert METHODS["fastem-diffpir"].info["guidance"] == "diffpir" and METHODS["fastem-diffpir"].accepts_kernel
    assert METHODS["diffpir-known-kernel"].needs_kernel
    assert METHODS["wiener-known-kernel"].needs_kernel and METHODS["wiener-known-kernel"].pipeline_class is None
    assert METHODS["fastem-pigdm"].accepts_kernel and not METHODS["diffusion-em"].accepts_kernel
    assert "em_iterations" in METHODS["diffusion-em"].option_names
    assert "em_iterations" not in METHODS["fastem-pigdm"].option_names


def test_registry_rejects_duplicates_and_conflicting_options(gamma_method):
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("dummy-gamma", gamma_run))
    with pytest.raises(ValueError, match="differs"):
        register_method(Method("dummy-other", gamma_run, options=(Option("steps", int, 7, "other default"),)))
    assert "dummy-other" not in METHODS
    with pytest.raises(ValueError, match="unknown method"):
        methods.get_method("nope")


def test_dummy_method_in_help_cli_and_evaluation(gamma_method, tmp_path, capsys, monkeypatch):
    for key, value in {"HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(key, value)
    help_text = build_parser()._subparsers._group_actions[0].choices["deblur"].format_help()
    assert "dummy-gamma" in help_text and "--gamma-exponent" in help_text

    image = np.full((20, 24, 3), 0.25, np.float32)
    PIL.Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out"
    code = main(["deblur", str(tmp_path / "in.png"), "-o", str(out), "--method", "dummy-gamma",
                 "--gamma-exponent", "0.5", "--quiet"])
    assert code == 0, capsys.readouterr().err
    restored = np.asarray(PIL.Image.open(out / "in_deblurred.png"), dtype=np.float64) / 255
    np.testing.assert_allclose(restored, 0.5, atol=1 / 255)  # 0.25 ** 0.5
    assert not (out / "in_kernel.npy").exists() and not (out / "in_kernel.png").exists()
    record = json.loads((out / "in.json").read_text())
    assert record["settings"]["method"] == "dummy-gamma" and record["settings"]["gamma_exponent"] == 0.5
    assert record["kernel_size"] is None and record["model"] is None and set(record["outputs"]) == {"image"}
    # an option of another method is refused, naming the methods that have it
    code = main(["deblur", str(tmp_path / "in.png"), "-o", str(tmp_path / "o2"), "--method", "dummy-gamma",
                 "--steps", "3"])
    assert code == 2 and "--steps does not apply to --method dummy-gamma" in capsys.readouterr().err

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        PIL.Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
    evaluation = tmp_path / "eval"
    args = ["--data_dir", str(images), "--resolution", "16", "--kernel_size", "5", "--sigma", "5",
            "--methods", "dummy-gamma", "identity", "--gamma_exponent", "1.0", "--output_dir", str(evaluation),
            "--extra_metrics", "none", "--num_grid", "1"]
    assert runner.main(args) == 0
    records = [json.loads(line) for line in (evaluation / "results.jsonl").read_text().splitlines()]
    gamma = [r for r in records if r["method"] == "dummy-gamma"]
    identity = [r for r in records if r["method"] == "identity"]
    assert len(gamma) == 2 and len(identity) == 2
    for g, i in zip(gamma, identity):  # exponent 1 = identity: the same image scores
        assert g["psnr"] == pytest.approx(i["psnr"]) and g["gamma_exponent"] == 1.0
        assert g["kernel_mse"] is None and g["mnc"] is None and g["reblur_total"] is None  # no kernel
        assert i["kernel_mse"] is not None
    summary = (evaluation / "summary.md").read_text()
    assert "| dummy-gamma | 5 | 2 |" in summary and "`dummy-gamma`: gamma_exponent 1.0" in summary
    assert json.loads((evaluation / "config.json").read_text())["gamma_exponent"] == 1.0


def test_a_method_without_default_model_asks_for_one(tmp_path, capsys):
    from diffusers_blind import FastEMDeblurPipeline

    register_method(Method("dummy-no-model", gamma_run, pipeline_class=FastEMDeblurPipeline, default_model=None))
    try:
        PIL.Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
        code = main(["deblur", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--method", "dummy-no-model"])
        err = capsys.readouterr().err
        assert code == 2 and "ships no default model: pass --model PATH" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()
    finally:
        unregister_method("dummy-no-model")


def test_dvsr_runs_from_the_cli_and_in_the_evaluation(tmp_path, capsys, monkeypatch):
    """DvSR (no kernel; a pipeline saved with a kernel estimator reports one) through the registry entry."""
    pytest.importorskip("diffusers_blind.pipelines.dvsr")  # present once the DvSR pipeline is merged
    from test_pipeline_dvsr import make_pipe

    for key, value in {"HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(key, value)
    make_pipe(estimator=False).save_pretrained(tmp_path / "dvsr")
    make_pipe(estimator=True).save_pretrained(tmp_path / "dvsr_k")
    images = tmp_path / "in"
    images.mkdir()
    for i in range(2):
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    for model, kernel in (("dvsr", False), ("dvsr_k", True)):
        out = tmp_path / f"out_{model}"
        assert main(["deblur", str(images), "-o", str(out), "--method", "dvsr", "--model", str(tmp_path / model),
                     "--perception-distortion", "1", "--quiet", "--seed", "0"]) == 0, capsys.readouterr().err
        assert (out / "0_deblurred.png").is_file() and (out / "0_kernel.npy").is_file() == kernel
        assert json.loads((out / "0.json").read_text())["settings"]["perception_distortion"] == 1.0
    assert runner.main(["--data_dir", str(images), "--resolution", "16", "--kernel_size", "5", "--methods", "dvsr",
                        "--model", str(tmp_path / "dvsr"), "--output_dir", str(tmp_path / "ev"),
                        "--extra_metrics", "none", "--num_grid", "1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["kernel_mse"] is None and r["psnr"] > 0 for r in records)


def test_dvsr_precision_from_the_cli_and_the_evaluation(tmp_path, capsys, monkeypatch):
    """``--precision`` reaches the DvSR networks as autocast (CLI and evaluation); other methods keep refusing it."""
    pytest.importorskip("diffusers_blind.pipelines.dvsr")
    from test_pipeline_dvsr import images as dvsr_images, make_pipe

    from diffusers_blind.methods import METHODS

    monkeypatch.setenv("TQDM_DISABLE", "1")
    pipe = make_pipe()
    seen = []
    handle = pipe.denoiser.register_forward_hook(lambda module, args, output: seen.append(output.sample.dtype))
    y = dvsr_images(1, height=16, width=16)
    results = {}
    try:
        for precision in (None, "float32", "bfloat16", "float16"):
            seen.clear()
            results[precision] = METHODS["dvsr"].run(
                y, sigma=5.0, kernel=None, generator=torch.Generator().manual_seed(0), pipeline=pipe, blur="valid",
                perception_distortion=None, dvsr_steps=3, dvsr_samples=2, precision=precision)
            expected = {None: torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                        "float16": torch.float16}[precision]
            assert seen and set(seen) == {expected}
    finally:
        handle.remove()
    assert torch.equal(results[None].image, results["float32"].image)
    for precision in ("bfloat16", "float16"):  # rounding of the networks, not another result
        assert results[precision].image.dtype == torch.float32
        assert 0 < float((results[precision].image - results[None].image).abs().max()) < 0.05

    pipe.save_pretrained(tmp_path / "dvsr")
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    base = ["deblur", str(tmp_path / "in.png"), "--model", str(tmp_path / "dvsr"), "--dvsr-steps", "2", "--quiet",
            "--seed", "0"]
    assert main(base + ["-o", str(tmp_path / "bf16"), "--method", "dvsr", "--precision", "bf16"]) == 0, \
        capsys.readouterr().err
    assert json.loads((tmp_path / "bf16" / "in.json").read_text())["settings"]["precision"] == "bfloat16"
    assert main(base + ["-o", str(tmp_path / "bad"), "--method", "dvsr", "--precision", "fp8"]) == 2
    assert "--precision" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    code = main(["deblur", str(tmp_path / "in.png"), "-o", str(tmp_path / "id"), "--method", "identity",
                 "--precision", "bf16", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--precision does not apply to --method identity" in err and "dvsr" in err
    assert not (tmp_path / "id").exists()

    args = runner.parse_args(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "ev"), "--methods", "dvsr",
                              "--precision", "bf16"])
    assert args.precision == "bfloat16" and runner.method_settings(args)["precision"] == "bfloat16"


def test_evaluation_model_folders_per_method():
    from diffusers_blind import DEFAULT_MODEL
    from diffusers_blind.evaluation.runner import resolve_models

    class OtherPipeline:
        pass

    register_method(Method("dummy-other-pipe", gamma_run, pipeline_class=OtherPipeline, default_model=None))
    try:
        both = ["fastem-pigdm", "pigdm-known-kernel", "identity"]
        assert resolve_models(both, []) == {"fastem-pigdm": DEFAULT_MODEL, "pigdm-known-kernel": DEFAULT_MODEL}
        assert set(resolve_models(both, ["m"]).values()) == {"m"}
        mixed = ["fastem-pigdm", "dummy-other-pipe"]
        assert resolve_models(mixed, ["dummy-other-pipe=o"]) == {"fastem-pigdm": DEFAULT_MODEL, "dummy-other-pipe": "o"}
        assert resolve_models(mixed, ["f", "dummy-other-pipe=o"]) == {"fastem-pigdm": "f", "dummy-other-pipe": "o"}
        for entries, match in ((["m"], "different pipelines"), ([], "ships no default model"),
                               (["a", "b"], "one PATH"), (["identity=x", "dummy-other-pipe=o"], "not a selected")):
            with pytest.raises(ValueError, match=match):
                resolve_models(mixed if entries != ["a", "b"] else both, entries)
        args = runner.parse_args(["--data_dir", ".", "--output_dir", "x", "--methods", *mixed,
                                  "--model", "dummy-other-pipe=o"])
        assert args.model == {"dummy-other-pipe": "o", "fastem-pigdm": DEFAULT_MODEL}  # stored in config.json
        assert runner.parse_args(["--data_dir", ".", "--output_dir", "x"]).model == DEFAULT_MODEL  # as before
    finally:
        unregister_method("dummy-other-pipe")


def test_blind_dps_runs_from_the_cli_and_in_the_evaluation(tmp_path, capsys, monkeypatch):
    """BlindDPS through its registry entry, next to Fast EM with a per-method --model, for both blur models."""
    pytest.importorskip("diffusers_blind.pipelines.blind_dps")  # present once the BlindDPS pipeline is merged
    from test_pipeline_blind_dps import pipe_with

    for key, value in {"HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(key, value)
    pipe_with().save_pretrained(tmp_path / "bdps")
    images = tmp_path / "in"
    images.mkdir()
    for i in range(2):
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    assert main(["deblur", str(images), "-o", str(out), "--method", "blind-dps", "--model", str(tmp_path / "bdps"),
                 "--steps", "3", "--quiet", "--seed", "0"]) == 0, capsys.readouterr().err
    assert (out / "0_deblurred.png").is_file() and (out / "0_kernel.npy").is_file()
    for blur in ("circular", "valid"):
        assert runner.main(["--data_dir", str(images), "--resolution", "16", "--kernel_size", "5", "--blur", blur,
                            "--methods", "blind-dps", "fastem-pigdm", "--model", f"blind-dps={tmp_path / 'bdps'}",
                            "--steps", "3", "--output_dir", str(tmp_path / f"ev_{blur}"), "--extra_metrics", "none",
                            "--num_grid", "1"]) == 0
        records = [json.loads(line) for line in (tmp_path / f"ev_{blur}" / "results.jsonl").read_text().splitlines()]
        assert len(records) == 4 and all(r["kernel_mse"] is not None for r in records)


def test_blind_dps_turbulence_runs_from_the_cli_and_in_the_evaluation(tmp_path, capsys, monkeypatch):
    """blind-dps-turbulence: a test input made by ``blur --turbulence``, restored from the command line (the
    estimated tilt field is written beside the image) and run in the evaluation."""
    from test_pipeline_blind_dps_turbulence import make_pipe

    for key, value in {"HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(key, value)
    assert "blind-dps-turbulence" in METHODS and METHODS["blind-dps-turbulence"].returns_kernel
    make_pipe().save_pretrained(tmp_path / "turb")
    sharp = tmp_path / "sharp.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 26, 3), dtype=np.uint8)).save(sharp)
    images = tmp_path / "in"
    assert main(["blur", str(sharp), "-o", str(images / "t.png"), "--turbulence", "--kernel", "gaussian",
                 "--kernel-size", "5", "--seed", "0"]) == 0
    out = tmp_path / "out"
    assert main(["deblur", str(images), "-o", str(out), "--method", "blind-dps-turbulence", "--model",
                 str(tmp_path / "turb"), "--steps", "3", "--quiet", "--seed", "0"]) == 0, capsys.readouterr().err
    assert (out / "t_deblurred.png").is_file() and (out / "t_kernel.npy").is_file()
    tilt = np.load(out / "t_tilt.npy")
    assert tilt.shape == (2, 20, 26) and np.isfinite(tilt).all() and np.abs(tilt).max() <= 2.5 + 1e-6
    record = json.loads((out / "t.json").read_text())
    assert record["settings"]["method"] == "blind-dps-turbulence" and "tilt_npy" in record["outputs"]
    # a rerun refuses to replace the files, the tilt field included
    assert main(["deblur", str(images), "-o", str(out), "--method", "blind-dps-turbulence", "--model",
                 str(tmp_path / "turb"), "--steps", "3", "--quiet", "--seed", "1"]) == 2
    np.testing.assert_array_equal(np.load(out / "t_tilt.npy"), tilt)
    assert runner.main(["--data_dir", str(images), "--resolution", "16", "--kernel_size", "5", "--blur", "valid",
                        "--methods", "blind-dps-turbulence", "--model", f"blind-dps-turbulence={tmp_path / 'turb'}",
                        "--steps", "3", "--output_dir", str(tmp_path / "ev"), "--extra_metrics", "none",
                        "--num_grid", "1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert records and all(r["method"] == "blind-dps-turbulence" and r["kernel_mse"] is not None for r in records)


def test_unset_steps_run_each_methods_own_default():
    """``--steps`` unset: each method runs (and records) its own pipeline's default, not one shared number."""
    from diffusers_blind.methods import default_steps, with_default_steps

    assert default_steps(METHODS["fastem-pigdm"]) == 50 and default_steps(METHODS["pigdm-known-kernel"]) == 50
    assert default_steps(METHODS["wiener-known-kernel"]) is None  # no pipeline
    assert with_default_steps(METHODS["fastem-dps"], {"steps": None, "particles": 1}) == {"steps": 50, "particles": 1}
    assert with_default_steps(METHODS["fastem-dps"], {"steps": 7})["steps"] == 7
    assert with_default_steps(METHODS["identity"], {"kernel_size": None}) == {"kernel_size": None}
    if "blind-dps" in METHODS:
        assert default_steps(METHODS["blind-dps"]) == 250


def test_the_evaluation_refuses_dvsr_options_that_cannot_go_together(tmp_path, capsys):
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit_:
        runner.parse_args(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "ev"), "--methods", "dvsr",
                           "--dvsr_steps", "1", "--perception_distortion", "0.5"])
    assert exit_.value.code == 2 and "not both" in capsys.readouterr().err


def test_fastem_check_refuses_a_tile_size_below_the_unets_multiple():
    from types import SimpleNamespace

    pipe = SimpleNamespace(kernel_estimator=object(),
                           unet=SimpleNamespace(config=SimpleNamespace(block_out_channels=(8, 8, 8, 8, 8))))
    with pytest.raises(ValueError, match="at least 16"):
        methods._fastem_check(pipe, {"tile_size": 8}, kernel_given=False)
    assert methods._fastem_check(pipe, {"tile_size": 16}, kernel_given=False) == []


def test_blind_fastem_methods_default_to_an_automatic_kernel_size_where_the_image_has_room():
    from types import SimpleNamespace

    from diffusers_blind.methods import default_kernel_size

    class Recorder:  # a pipeline stand-in that records the kernel size it is called with
        kernel_estimator = SimpleNamespace(config=SimpleNamespace(kernel_size=9))

        def __call__(self, y, **kwargs):
            self.kernel_size = kwargs["kernel_size"]
            kernel = torch.zeros(1, 1, 9, 9)
            kernel[..., 4, 4] = 1
            return SimpleNamespace(images=y, kernels=kernel, sigma=[5.0], uncertainty=None, fallback=None, fit=None)

    pipe = Recorder()
    assert default_kernel_size(pipe, torch.zeros(1, 3, 18, 30)) == "auto"  # room for two 9 px supports
    assert default_kernel_size(pipe, torch.zeros(1, 3, 17, 30)) is None  # auto could go below the model's size
    y = torch.rand(1, 3, 24, 24)
    call = dict(sigma=5.0, generator=None, pipeline=pipe, blur="valid", steps=None, particles=1, guidance_scale=None)
    for name, expected in (("fastem-pigdm", "auto"), ("fastem-dps", "auto"), ("fastem-diffpir", "auto"),
                           ("diffusion-em", None)):
        METHODS[name].run(y, kernel=None, **call)
        assert pipe.kernel_size == expected, name
    METHODS["fastem-pigdm"].run(y, kernel=None, kernel_size=15, **call)
    assert pipe.kernel_size == 15  # an explicit size is kept
    METHODS["fastem-pigdm"].run(y, kernel=torch.ones(1, 1, 3, 3) / 9, **call)
    assert pipe.kernel_size is None  # a known kernel has its own size
    pipe.kernel_estimator.config.kernel_size = 7  # a size "auto" cannot choose: keep the model's
    assert default_kernel_size(pipe, torch.zeros(1, 3, 64, 64)) is None


@pytest.mark.parametrize("method", ["blind-dps", "blind-dps-turbulence"])
def test_blind_dps_on_an_image_below_its_kernel_size_says_how_large_the_image_must_be(tmp_path, capsys, method):
    if method == "blind-dps":
        from test_pipeline_blind_dps import pipe_with as make
    else:
        from test_pipeline_blind_dps_turbulence import make_pipe as make
    make().save_pretrained(tmp_path / "model")  # kernel prior of 8 px
    PIL.Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "small.png")
    code = main(["deblur", str(tmp_path / "small.png"), "-o", str(tmp_path / "out"), "--method", method,
                 "--model", str(tmp_path / "model"), "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{method} needs at least 8 px a side" in err and "7x6" in err
    assert "kernel_size" not in err  # not an option of the command line


def test_blind_dps_start_options_reach_the_pipeline_and_wrong_starts_are_refused(tmp_path, capsys, monkeypatch):
    """``--kernel-init``, ``--kernel-strength`` and ``--sigma`` reach BlindDPS; each method refuses the other's start."""
    pytest.importorskip("diffusers_blind.pipelines.blind_dps")
    from test_pipeline_blind_dps import pipe_with

    from diffusers_blind import BlindDPSPipeline

    monkeypatch.setenv("TQDM_DISABLE", "1")
    pipe_with().save_pretrained(tmp_path / "bdps")
    image = tmp_path / "a.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(image)
    seen, original = [], BlindDPSPipeline.__call__

    def spy(self, img, **kwargs):
        seen.append((kwargs.get("kernel_init"), kwargs.get("kernel_strength"), kwargs.get("sigma")))
        return original(self, img, **{**kwargs, "kernel_init": "noise", "kernel_strength": None})  # no estimator

    monkeypatch.setattr(BlindDPSPipeline, "__call__", spy)
    common = ["--method", "blind-dps", "--model", str(tmp_path / "bdps"), "--steps", "2", "--quiet", "--seed", "0"]
    assert main(["deblur", str(image), "-o", str(tmp_path / "o1"), *common, "--kernel-init", "sparse",
                 "--kernel-strength", "0.25", "--sigma", "7"]) == 0, capsys.readouterr().err
    assert main(["deblur", str(image), "-o", str(tmp_path / "o2"), *common]) == 0
    assert seen == [("sparse", 0.25, 7.0), (None, None, 10.0)]  # unset: the model's start, the CLI's default sigma
    record = json.loads((tmp_path / "o1" / "a.json").read_text())
    assert record["settings"]["kernel_init"] == "sparse" and record["settings"]["kernel_strength"] == 0.25
    capsys.readouterr()
    assert main(["deblur", str(image), "-o", str(tmp_path / "o3"), *common, "--kernel-init", "dirac"]) == 2
    assert "not a start of blind-dps" in capsys.readouterr().err
    assert main(["deblur", str(image), "-o", str(tmp_path / "o4"), "--method", "fastem-pigdm", "--kernel-init",
                 "noise", "--quiet"]) == 2
    assert "not a start of fastem-pigdm" in capsys.readouterr().err
    for bad in ("0", "1.5"):
        assert main(["deblur", str(image), "-o", str(tmp_path / "o5"), *common, "--kernel-strength", bad]) == 2
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o5").exists()


@pytest.mark.parametrize("name", ["blind-dps", "blind-dps-turbulence"])
def test_blind_dps_methods_take_the_precision_option(name):
    """``--precision`` reaches BlindDPS's UNets as autocast; ``auto`` follows the device."""
    from test_pipeline_blind_dps import components as blind_dps_components

    from diffusers_blind.methods import METHODS
    from diffusers_blind.pipelines.blind_dps import BlindDPSPipeline, BlindDPSTurbulencePipeline

    assert "precision" in {option.name for option in METHODS[name].options}
    parts = blind_dps_components()
    if name == "blind-dps-turbulence":
        from conftest import tiny_unet

        pipe = BlindDPSTurbulencePipeline(parts["unet"], parts["kernel_unet"], tiny_unet(2, 2, sample_size=16),
                                          parts["scheduler"])
    else:
        pipe = BlindDPSPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.kernel_unet.register_forward_hook(lambda module, args, output: seen.append(torch.is_autocast_enabled("cpu")))
    y = torch.rand(1, 3, 16, 16)
    for precision, expected in (("float32", False), ("bf16", True)):
        seen.clear()
        METHODS[name].run(y, sigma=5.0, kernel=None, generator=torch.Generator().manual_seed(0), pipeline=pipe,
                          blur="circular", steps=2, particles=1, guidance_scale=None, precision=precision)
        assert seen and set(seen) == {expected}
