"""scripts/benchmark_blind_dps.py end to end on tiny pipelines and two small photographs (both modes, resume)."""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import smooth_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark_blind_dps as bench  # noqa: E402


def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(2):
        array = (smooth_images(1, 3, 20, 20, seed=index)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"p{index}.png")
    return folder


def test_deblurring_and_turbulence_tables_resume(tmp_path):
    from test_pipeline_blind_dps_turbulence import make_pipe

    make_pipe().save_pretrained(tmp_path / "model")  # a turbulence folder also loads as BlindDPSPipeline
    folder = photos(tmp_path)
    common = ["--photo_dir", str(folder), "--model", str(tmp_path / "model"), "--resolution", "16",
              "--kernel_size", "5", "--steps", "2", "--fastem_steps", "2"]
    out = tmp_path / "deblur"
    records = bench.main(["--output_dir", str(out), *common])
    assert {(r["photo"], r["method"]) for r in records} == {
        (p, m) for p in ("p0", "p1") for m in ("blurry", "blind-dps", "fastem-pigdm", "oracle")}
    for r in records:
        assert np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
        if r["method"] in ("blind-dps", "fastem-pigdm"):
            assert 0 < r["mnc"] <= 1 + 1e-6 and r["kernel_mse"] >= 0 and r["seconds"] > 0
    table = (out / "table.md").read_text()
    assert "photos (2): p0, p1" in table and "| oracle | 2 |" in table and (out / "p0.png").is_file()
    # the same photo gets the same degradation whatever the subset: the blurry PSNR is reproduced
    again = bench.main(["--output_dir", str(tmp_path / "subset"), *common, "--photos", "p1", "--methods", "oracle"])
    first = {r["method"]: r for r in records if r["photo"] == "p1"}
    assert abs(again[0]["psnr"] - first["blurry"]["psnr"]) < 1e-9
    # a rerun skips what is done
    n = len((out / "results.jsonl").read_text().splitlines())
    bench.main(["--output_dir", str(out), *common])
    assert len((out / "results.jsonl").read_text().splitlines()) == n

    turb = tmp_path / "turb"
    records = bench.main(["--output_dir", str(turb), *common, "--turbulence", "--gaussian_std", "1"])
    methods = {r["method"] for r in records}
    assert methods == {"blurry", "blind-dps", "blind-dps-turbulence"}
    for r in records:
        assert r["tilt_rms"] > 0
        if r["method"] == "blind-dps-turbulence":
            assert np.isfinite(r["tilt_rmse"]) and r["tilt_rmse"] > 0
    assert "(zero field)" in (turb / "table.md").read_text()
