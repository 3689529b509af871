#!/usr/bin/env python
"""Measure DvSR along its perception-distortion knob on held-out photographs with realistic borders.

Inputs: a folder of sharp photographs at least ``resolution + 32`` wide (e.g.
``python scripts/prepare_eval_photos.py --output /tmp/eval288 --resolution 288``). For each photograph
and each noise level, a camera-shake kernel of odd size drawn in ``[15, 33]`` blurs the central
``resolution + k − 1`` crop and only the valid ``resolution²`` centre is kept (no wrap-around, no
padding), Gaussian noise of ``σ`` 8-bit levels is added and the result quantised to 8 bits.

Rows: the blurry input, the predictor alone (``x_init``), and DvSR at each ``--settings`` entry
``STEPSxSAMPLES`` (default: the knob's points 0, 0.5 and 1: 100×1 "Ours", 32×2, 10×4 "Ours-SA");
with ``--fastem N`` also the registry's ``fastem-pigdm`` (shipped default model, its default steps, the
true σ) on the first ``N`` inputs (same degraded inputs: a paired comparison). ``--rows`` restricts the
run to some rows (e.g. run ``fastem-pigdm`` in a second process into the same ``--output``; records are
appended to ``records.jsonl`` and ``--summarize_only`` rebuilds the table from all of them).
Metrics: PSNR and SSIM (RGB, ``[0, 1]``), NIQE (offline model), LPIPS only when its weights are present
(otherwise the column reads "n/a"). Wall time per image for each row.
Writes ``results.json``, ``table.md``, ``pd_plot.png`` (PSNR vs NIQE, rows measured on every input) and output PNGs.

Example::

    OMP_NUM_THREADS=2 python scripts/benchmark_dvsr.py /tmp/eval288 --output /tmp/dvsr_bench --num_threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", type=Path)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped DvSR model)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--sigmas", type=float, nargs="+", default=[5.0, 10.0])
    p.add_argument("--kernel_sizes", type=int, nargs=2, default=[15, 33])
    p.add_argument("--settings", nargs="+", default=["100x1", "32x2", "10x4"])
    p.add_argument("--names", nargs="*", default=None, help="only these photographs (file stems)")
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_images", type=int, default=3, help="write outputs of the first N inputs")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no",
                   help="DvSR networks under autocast (the pipeline's mixed_precision)")
    p.add_argument("--fastem", type=int, default=0, help="also run fastem-pigdm on the first N inputs")
    p.add_argument("--fastem_steps", type=int, default=None,
                   help="diffusion steps of the fastem-pigdm row (default: the model's, 50 for the shipped one)")
    p.add_argument("--rows", nargs="*", default=None,
                   help="compute only these rows (blurry, predictor, 'dvsr STEPSxSAMPLES', fastem-pigdm)")
    p.add_argument("--summarize_only", action="store_true", help="rebuild the table and plot from <output>/records.jsonl")
    return p.parse_args(argv)


def load(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def degrade(photo: torch.Tensor, resolution: int, kernel_sizes, sigma: float, seed: int):
    """``(blurry, sharp, kernel)``: valid blur of a larger centre crop, noise, 8-bit quantisation."""
    from diffusers_blind.ops import motion_kernel
    from diffusers_blind.pipelines.dvsr.training_utils import make_blurry_sharp_pair

    rng = np.random.default_rng(seed)
    size = int(rng.integers(kernel_sizes[0] // 2, kernel_sizes[1] // 2 + 1)) * 2 + 1
    kernel = motion_kernel(size, float(rng.uniform(0.3, 0.8)), rng)
    big = resolution + size - 1
    h, w = photo.shape[-2:]
    if min(h, w) < big:
        raise SystemExit(f"photographs must be at least {big}px (resolution + kernel − 1); got {h}x{w}")
    top, left = (h - big) // 2, (w - big) // 2
    large = photo[..., top : top + big, left : left + big]
    blurry, sharp = make_blurry_sharp_pair(large, kernel, sigma / 255, generator=torch.Generator().manual_seed(seed))
    return blurry, sharp, kernel


def save_png(x: torch.Tensor, path: Path) -> None:
    array = (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def pd_plot(summary: dict, path: Path) -> None:
    """PSNR (x) vs NIQE (y, lower is better), one panel per σ (``evaluation.figures``)."""
    from diffusers_blind.evaluation.figures import perception_distortion_panels

    perception_distortion_panels(summary, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    import diffusers_blind
    from diffusers_blind import StochasticRefinementDeblurPipeline, metrics

    if args.summarize_only:
        lines = (args.output / "records.jsonl").read_text().splitlines()
        summarize([json.loads(line) for line in lines if line.strip()], args)
        return 0
    pipe = StochasticRefinementDeblurPipeline.from_pretrained(args.model or diffusers_blind.DVSR_DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    fastem = fastem_pipe = None
    if args.fastem and (args.rows is None or "fastem-pigdm" in args.rows):
        from diffusers_blind.methods import get_method, load_pipeline

        fastem = get_method("fastem-pigdm")
        fastem_pipe = load_pipeline(fastem, None, "cpu")
        fastem_pipe.set_progress_bar_config(disable=True)

    def lpips(image, sharp):
        try:
            return float(metrics.lpips(image, sharp)[0])
        except metrics.MetricUnavailableError:
            return None
    settings = [tuple(int(v) for v in s.lower().split("x")) for s in args.settings]
    all_files = sorted(f for f in args.photos.iterdir() if f.suffix.lower() == ".png")
    files = [f for f in all_files if f.stem in args.names] if args.names else all_files
    args.output.mkdir(parents=True, exist_ok=True)
    records = []
    done = set()  # (image, sigma, row) already in records.jsonl (an earlier or a parallel run): not redone
    if (args.output / "records.jsonl").is_file():
        for line in (args.output / "records.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done.add((rec["image"], float(rec["sigma"]), rec["row"]))
    for index, (f, sigma) in enumerate((f, s) for f in files for s in args.sigmas):
        seed = args.seed * 1000 + all_files.index(f) * 10 + int(sigma)  # the same input whatever --names selects
        blurry, sharp, kernel = degrade(load(f), args.resolution, args.kernel_sizes, sigma, seed)
        def wanted(row):
            return (args.rows is None or row in args.rows) and (f.stem, float(sigma), row) not in done
        outputs = {"blurry": (blurry, 0.0)} if wanted("blurry") else {}
        cpu_seconds = {}
        if wanted("predictor"):
            start, cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                x_init = pipe.predictor((blurry * 2 - 1).contiguous(memory_format=torch.channels_last))
            outputs["predictor"] = (((x_init + 1) / 2).clamp(0, 1), time.perf_counter() - start)
            cpu_seconds["predictor"] = time.process_time() - cpu
        for steps, samples in settings:
            if not wanted(f"dvsr {steps}x{samples}"):
                continue
            start, cpu = time.perf_counter(), time.process_time()
            out = pipe(blurry, num_inference_steps=steps, num_samples=samples, output_type="pt",
                       generator=torch.Generator().manual_seed(seed),
                       mixed_precision=None if args.mixed_precision == "no" else args.mixed_precision)
            outputs[f"dvsr {steps}x{samples}"] = (out.images, time.perf_counter() - start)
            cpu_seconds[f"dvsr {steps}x{samples}"] = time.process_time() - cpu
        if index < args.fastem and wanted("fastem-pigdm"):
            start, cpu = time.perf_counter(), time.process_time()
            result = fastem.run(blurry, sigma=sigma, kernel=None, generator=torch.Generator().manual_seed(seed),
                                pipeline=fastem_pipe, blur="valid", steps=args.fastem_steps, particles=1, guidance_scale=None,
                                kernel_size=None)
            outputs["fastem-pigdm"] = (result.image, time.perf_counter() - start)
            cpu_seconds["fastem-pigdm"] = time.process_time() - cpu
        if not outputs:
            continue
        for name, (image, seconds) in outputs.items():
            rec = {"image": f.stem, "sigma": sigma, "kernel_size": int(kernel.shape[-1]), "row": name,
                   "psnr": float(metrics.psnr(image, sharp)), "ssim": float(metrics.ssim(image, sharp)),
                   "niqe": float(metrics.niqe(image)), "lpips": lpips(image, sharp), "seconds": seconds,
                   "cpu_seconds": cpu_seconds.get(name, 0.0), "load": os.getloadavg()[0]}
            records.append(rec)
            if index < args.save_images:
                save_png(image, args.output / f"{f.stem}_s{int(sigma)}_{name.replace(' ', '_')}.png")
        if index < args.save_images:
            save_png(sharp, args.output / f"{f.stem}_s{int(sigma)}_sharp.png")
        with open(args.output / "records.jsonl", "a") as fh:  # partial results survive an interruption
            for rec in records[-len(outputs):]:
                fh.write(json.dumps(rec) + "\n")
        line = " | ".join(f"{r['row']} {r['psnr']:.2f}/{r['niqe']:.2f}" for r in records[-len(outputs):])
        print(f"[bench] {f.stem} σ={sigma:g} k={kernel.shape[-1]}: {line}", flush=True)
    lines = (args.output / "records.jsonl").read_text().splitlines()  # with other processes' rows
    summarize([json.loads(line) for line in lines if line.strip()], args)
    return 0


def summarize(records: list[dict], args) -> None:
    """Mean per row and σ → ``results.json``, ``table.md``, ``pd_plot.png``."""
    summary: dict = {}
    unique = {}
    for rec in records:  # the first record of each (image, σ, row)
        unique.setdefault((rec["image"], float(rec["sigma"]), rec["row"]), rec)
    records = list(unique.values())
    for rec in records:
        summary.setdefault(rec["row"], {}).setdefault(f"{rec['sigma']:g}", []).append(rec)
    def mean(rs, k):
        values = [r.get(k) for r in rs]
        return None if any(v is None for v in values) else float(np.mean(values))

    summary = {row: {s: {k: mean(rs, k) for k in ("psnr", "ssim", "niqe", "lpips", "seconds", "cpu_seconds", "load")} | {"n": len(rs)}
                     for s, rs in per.items()} for row, per in summary.items()}
    (args.output / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "records": records, "summary": summary}, indent=1))
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = ["| row | σ | n | PSNR ↑ | SSIM ↑ | NIQE ↓ | LPIPS ↓ | wall s / image | CPU s / image | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, per in summary.items():
        for s, v in sorted(per.items(), key=lambda item: float(item[0])):
            lines.append(f"| {row} | {s} | {v['n']} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['niqe']:.2f} | "
                         f"{fmt(v['lpips'], '.4f')} | {v['seconds']:.1f} | {fmt(v['cpu_seconds'], '.1f')} | "
                         f"{fmt(v['load'], '.1f')} |")
    # rows that ran on a subset (fastem-pigdm): every row again on exactly those inputs
    subset_rows = [row for row, per in summary.items() if sum(v["n"] for v in per.values()) < max(
        sum(v["n"] for v in p.values()) for p in summary.values())]
    if subset_rows:
        keys = {(r["image"], r["sigma"]) for r in records if r["row"] in subset_rows}
        lines += ["", f"Same table on the {len(keys)} inputs where {', '.join(subset_rows)} ran:", "",
                  "| row | n | PSNR ↑ | SSIM ↑ | NIQE ↓ | s / image |", "|---|---|---|---|---|---|"]
        for row in summary:
            rs = [r for r in records if r["row"] == row and (r["image"], r["sigma"]) in keys]
            if rs:
                lines.append(f"| {row} | {len(rs)} | {mean(rs, 'psnr'):.2f} | {mean(rs, 'ssim'):.4f} | "
                             f"{mean(rs, 'niqe'):.2f} | {mean(rs, 'seconds'):.2f} |")
    (args.output / "table.md").write_text("\n".join(lines) + "\n")
    pd_plot({row: per for row, per in summary.items() if row not in subset_rows}, args.output / "pd_plot.png")  # full-set rows only
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
