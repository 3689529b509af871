"""The summary of an evaluation: mean ± std per (method, σ) as ``summary.csv`` and ``summary.md``."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..io import save_text
from ..methods import METHODS
from .degradations import BLUR_MODES


SUMMARY_METRICS = (
    ("psnr", "PSNR (dB) ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("gmsd", "GMSD ↓", "{:.4f}"),
    ("lpips", "LPIPS ↓", "{:.4f}"),
    ("niqe", "NIQE ↓", "{:.3f}"),
    ("brisque", "BRISQUE ↓", "{:.2f}"),
    ("sharpness_ratio", "sharpness ratio (→1)", "{:.3f}"),
    ("kernel_mse", "kernel MSE ↓", "{:.3e}"),
    ("mnc", "MNC ↑", "{:.4f}"),
    ("reblur_per_element", "L_reblur / M", "{:.3e}"),
    ("reblur_total", "L_reblur", "{:.4g}"),
    ("time_s", "time / image (s)", "{:.2f}"),
)



def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        return float(np.mean(array)), float("nan"), len(values)
    return float(array.mean()), float(array.std()), len(values)


def summarise(records: list[dict], args, output_dir: Path, missing_metrics: dict) -> list[dict]:
    groups = defaultdict(list)
    for record in records:
        groups[(record["method"], float(record["sigma"]))].append(record)
    order = {m: i for i, m in enumerate(args.methods)}
    keys = sorted(groups, key=lambda k: (k[1], order.get(k[0], len(order)), k[0]))
    present = [m for m, _, _ in SUMMARY_METRICS if any(r.get(m) is not None for r in records)]
    rows = []
    for method, sigma in keys:
        row = {"method": method, "sigma": sigma, "blur": args.blur_mode, "n": len(groups[(method, sigma)]),
               "fallbacks": sum(bool(r.get("fallback")) for r in groups[(method, sigma)])}
        for metric in present:
            mean, std, _ = _mean_std([r.get(metric) for r in groups[(method, sigma)]])
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        rows.append(row)

    buffer = io.StringIO(newline="")
    fields = ["method", "sigma", "blur", "n", "fallbacks", *[f"{m}_{s}" for m in present for s in ("mean", "std")]]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    save_text(buffer.getvalue(), output_dir / "summary.csv")

    formats = {m: (label, fmt) for m, label, fmt in SUMMARY_METRICS}
    lines = ["# Evaluation summary", ""]
    source = args.data_dir or args.dataset_id
    lines.append(
        f"Data `{source}` (split `{args.split}`), {len({r['image_index'] for r in records})} images, "
        f"resolution {args.resolution or 'native'}, kernel `{args.kernel}` (size {args.kernel_size}"
        f"{', intensity ' + str(args.intensity) if args.kernel == 'motion' else ''}), blur `{args.blur_mode}` "
        f"({BLUR_MODES[args.blur_mode]}), seed {args.seed}."
    )
    if isinstance(args.model, dict):
        lines.append("Models: " + "; ".join(f"`{m}`: `{folder}`" for m, folder in args.model.items()) + ".")
    elif args.model is not None:
        lines.append(f"Model `{args.model}`.")
    for method in args.methods:
        options = METHODS[method].options if method in METHODS else ()
        if options:
            values = ", ".join(f"{o.name} {'default' if getattr(args, o.name) is None else getattr(args, o.name)}"
                               for o in options if o.name != "kernel_size")
            if values:
                lines.append(f"`{method}`: {values}.")
    lines += ["", "Mean ± standard deviation over images; σ in 8-bit levels. Kernel metrics are not reported for "
              "known-kernel methods nor for methods that estimate no kernel; `identity` is scored with a Dirac "
              "kernel. *fallback*: blind runs whose guard returned the blurry input (their scores are the input's; "
              "`fallback` in `results.jsonl` names them).", ""]
    header = ["method", "σ", "n", "fallback", *[formats[m][0] for m in present]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        cells = [row["method"], f"{row['sigma']:g}", str(row["n"]), str(row["fallbacks"])]
        for metric in present:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            fmt = formats[metric][1]
            cells.append("–" if mean is None else f"{fmt.format(mean)} ± {fmt.format(std)}")
        lines.append("| " + " | ".join(cells) + " |")
    if missing_metrics:
        lines += ["", "Optional metrics not computed on this machine:", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in missing_metrics.items()]
    lines += ["", "Per-image results: `results.jsonl`. Conventions: docs/evaluation.md.", ""]
    save_text("\n".join(lines), output_dir / "summary.md")
    return rows
