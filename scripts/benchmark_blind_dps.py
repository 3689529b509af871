#!/usr/bin/env python
"""BlindDPS benchmark on evaluation photographs: PSNR, SSIM, kernel MSE, MNC, wall time; turbulence: tilt error.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/benchmark_blind_dps.py --output_dir runs/bench_bdps \
        --photo_dir data/eval_photos --resolution 128 --steps 250 --methods blind-dps fastem-pigdm oracle

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/benchmark_blind_dps.py --output_dir runs/bench_turb \
        --photo_dir data/eval_photos --resolution 128 --steps 250 --turbulence

Each photo (``--photo_dir``: every PNG there, or scikit-image's samples; centre-cropped and box-downscaled to
``--resolution``) is degraded with its own seeded kernel and noise, the seed a function of the photo's name (so a
subset or another order gives the same inputs):

* deblurring: a motion kernel (``--kernel_size``, ``--intensity``), blurred with the ``--blur_mode`` border;
* ``--turbulence``: tilted by a seeded ``ops.tilt_map`` field (±2.5 px, edge pixels repeated), then blurred by
  a Gaussian kernel (``--kernel_size``, std ``--gaussian_std``; the paper's turbulence blur);

then Gaussian noise of ``--sigma`` 8-bit levels, clipped to ``[0, 1]``. Methods (``--methods``):
``blind-dps`` (BlindDPSPipeline, the same border model, at every ``--steps``), ``fastem-pigdm`` (Fast EM,
Pi-GDM, 100 steps, blind), ``oracle`` (the same Fast EM pipeline with the true kernel: non-blind Pi-GDM), and
``blurry`` (the input itself) always. With ``--turbulence`` the methods are ``blind-dps-turbulence`` (three
chains) and ``blind-dps`` (no tilt model), and the records add the tilt-field RMSE in pixels (and the RMSE of
a zero estimate, i.e. the true field's RMS).

Results are appended to ``results.jsonl`` as they come (a rerun skips the (photo, method, steps) already
there, so a stopped run resumes); ``table.md`` is rewritten after every photo (``--table_only`` rebuilds it),
with one PNG per photo (sharp | degraded | restorations; kernels below).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_eval_photos import load_photos, square_crop  # noqa: E402


METHODS = ("blind-dps", "fastem-pigdm", "oracle", "blind-dps-turbulence")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--model", default=None, help="BlindDPS pipeline folder (default: the shipped one)")
    p.add_argument("--photo_dir", type=Path, default=None, help="folder of PNG photographs (default: scikit-image's)")
    p.add_argument("--photos", nargs="+", default=None, help="names to run (default: all in --photo_dir, else 3)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--kernel_size", type=int, default=33)
    p.add_argument("--intensity", type=float, default=0.5)
    p.add_argument("--sigma", type=float, default=10.0, help="noise std in 8-bit levels")
    p.add_argument("--blur_mode", choices=("reflect", "circular"), default="reflect")
    p.add_argument("--turbulence", action="store_true", help="tilt then Gaussian blur; run the turbulence pipeline")
    p.add_argument("--gaussian_std", type=float, default=3.0, help="turbulence blur std in pixels")
    p.add_argument("--steps", type=int, nargs="+", default=[250], help="BlindDPS steps (each is one method row)")
    p.add_argument("--fastem_steps", type=int, default=100)
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="default: blind-dps fastem-pigdm oracle; with --turbulence: blind-dps-turbulence blind-dps")
    p.add_argument("--guidance_scale", type=float, default=None, help="BlindDPS step size (default: the folder's)")
    p.add_argument("--step_size", default="sqrt_alpha_bar", choices=("sqrt_alpha_bar", "constant"))
    p.add_argument("--sparsity_weight", type=float, default=None)
    p.add_argument("--kernel_init", choices=("noise", "sparse"), default=None,
                   help="start of BlindDPS's kernel chain (default: the folder's; noise = the paper)")
    p.add_argument("--kernel_strength", type=float, default=None,
                   help="fraction of the steps BlindDPS's kernel chain runs after a sparse start (default: the folder's)")
    p.add_argument("--boundary_margin", type=int, default=0)
    p.add_argument("--precision", default=None,
                   help="BlindDPS UNets' arithmetic: float32 (default), bfloat16 / bf16, float16 / fp16 or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--table_only", action="store_true", help="rebuild table.md from results.jsonl and stop")
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = ["blind-dps-turbulence", "blind-dps"] if args.turbulence else ["blind-dps", "fastem-pigdm", "oracle"]
    return args


def photo_seed(name: str, seed: int) -> int:
    """A per-photo seed that depends on the name only (stable under subsets and reordering)."""
    return seed * 1000 + zlib.crc32(name.encode()) % 1000


def load_sharp(args) -> dict[str, np.ndarray]:
    if args.photo_dir is not None:
        photos = {path.stem: np.asarray(Image.open(path).convert("RGB")) for path in sorted(args.photo_dir.glob("*.png"))}
        if not photos:
            raise SystemExit(f"no PNG photographs in {args.photo_dir}")
    else:
        photos = load_photos()
    names = args.photos or (sorted(photos) if args.photo_dir is not None else ["astronaut", "camera", "coffee"])
    missing = [n for n in names if n not in photos]
    if missing:
        raise SystemExit(f"unknown photos {missing}; available: {sorted(photos)}")
    return {name: photos[name] for name in names}


def degrade(x: torch.Tensor, name: str, args):
    """``(y, kernel, field or None)`` for one sharp ``(1, 3, H, W)`` photo (see the module docstring)."""
    from diffusers_blind.ops import BlurOperator, TiltBlurOperator, TiltOperator, gaussian_kernel, motion_kernel, tilt_map

    seed = photo_seed(name, args.seed)
    g = torch.Generator().manual_seed(seed)
    if args.turbulence:
        kernel = gaussian_kernel(args.kernel_size, args.gaussian_std)
        field = tilt_map(*x.shape[-2:], generator=np.random.default_rng([seed, 1]))
        clean = TiltBlurOperator(BlurOperator(args.blur_mode), TiltOperator("border"))(x, kernel, field)
    else:
        kernel, field = motion_kernel(args.kernel_size, args.intensity, generator=seed), None
        clean = BlurOperator(args.blur_mode)(x, kernel)
    y = (clean + args.sigma / 255 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return y, kernel, field


def kernel_tile(kernel: torch.Tensor, size: int) -> np.ndarray:
    k = kernel.detach().double().reshape(kernel.shape[-2:])
    k = (k / k.max().clamp_min(1e-12) * 255).round().byte().numpy()
    image = Image.fromarray(k).resize((size, size), Image.NEAREST).convert("RGB")
    return np.asarray(image)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def run_method(method: str, steps: int, y, kernel, pipes, args, generator):
    """``(image, kernel, tilt or None)`` of one method on ``y``."""
    if method in ("blind-dps", "blind-dps-turbulence"):
        out = pipes[method](y, num_inference_steps=steps, blur_model=args.blur_mode, step_size=args.step_size,
                            guidance_scale=args.guidance_scale, boundary_margin=args.boundary_margin,
                            generator=generator, output_type="pt", precision=args.precision,
                            **({} if method == "blind-dps-turbulence" else {
                                "sparsity_weight": args.sparsity_weight, "kernel_init": args.kernel_init,
                                "kernel_strength": args.kernel_strength, "sigma": args.sigma}))
        return out.images, out.kernels, getattr(out, "tilts", None)
    out = pipes["fastem"](y, sigma=args.sigma, num_inference_steps=steps, generator=generator, output_type="pt",
                          kernel=kernel if method == "oracle" else None,
                          kernel_size=None if method == "oracle" else args.kernel_size)
    return out.images, out.kernels, None


def write_table(results: list[dict], path: Path) -> str:
    """Means per (method, steps) over the photos every row of the table has (so rows compare like with like)."""
    keys = sorted({(r["method"], r.get("steps")) for r in results},
                  key=lambda k: (k[0] != "blurry", k[0], k[1] or 0))
    photos = sorted(set.intersection(*[{r["photo"] for r in results if (r["method"], r.get("steps")) == key}
                                       for key in keys])) if keys else []
    lines = [f"photos ({len(photos)}): {', '.join(photos)}", "",
             "| method | steps | PSNR (dB) | SSIM | kernel MSE | MNC | tilt RMSE (px) | s / image |",
             "|---|---|---|---|---|---|---|---|"]

    def mean(rs, key, fmt):
        values = [r[key] for r in rs if r.get(key) is not None]
        return format(float(np.mean(values)), fmt) if values and len(values) == len(rs) else "–"

    for method, steps in keys:
        rs = [r for r in results if (r["method"], r.get("steps")) == (method, steps) and r["photo"] in photos]
        if not rs:
            continue
        tilt = mean(rs, "tilt_rmse", ".3f")
        if method == "blurry" and rs[0].get("tilt_rms") is not None:
            tilt = f"{mean(rs, 'tilt_rms', '.3f')} (zero field)"
        lines.append(f"| {method} | {steps or '–'} | {mean(rs, 'psnr', '.2f')} | {mean(rs, 'ssim', '.3f')} | "
                     f"{mean(rs, 'kernel_mse', '.2e')} | {mean(rs, 'mnc', '.3f')} | {tilt} | {mean(rs, 'seconds', '.0f')} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv=None):
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    log = args.output_dir / "results.jsonl"
    results = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if args.table_only:
        print(write_table(results, args.output_dir / "table.md"))
        return results
    earlier = {r.get("precision") for r in results if r["method"].startswith("blind-dps")}
    if earlier - {args.precision}:  # rows are resumed by (photo, method, steps): one precision per folder
        raise SystemExit(f"{args.output_dir} holds BlindDPS rows run with --precision {sorted(map(str, earlier))}; "
                         f"use another --output_dir for --precision {args.precision}")
    torch.set_num_threads(args.num_threads)
    import diffusers_blind
    from diffusers_blind import BlindDPSPipeline, BlindDPSTurbulencePipeline, FastEMDeblurPipeline
    from diffusers_blind.metrics import kernel_mse, mnc, psnr, ssim

    (args.output_dir / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()}, indent=1))
    folder = args.model or diffusers_blind.BLIND_DPS_DEFAULT_MODEL
    pipes = {}
    if "blind-dps" in args.methods:
        pipes["blind-dps"] = BlindDPSPipeline.from_pretrained(folder)
    if "blind-dps-turbulence" in args.methods:
        pipes["blind-dps-turbulence"] = BlindDPSTurbulencePipeline.from_pretrained(folder)
    if {"fastem-pigdm", "oracle"} & set(args.methods):
        pipes["fastem"] = FastEMDeblurPipeline.from_pretrained(diffusers_blind.DEFAULT_MODEL)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    done = {(r["photo"], r["method"], r.get("steps")) for r in results}

    def add(record):
        results.append(record)
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    runs = [(m, s) for m in args.methods if m.startswith("blind-dps") for s in args.steps]
    runs += [(m, args.fastem_steps) for m in args.methods if m in ("fastem-pigdm", "oracle")]
    for name, array in load_sharp(args).items():
        sharp = square_crop(Image.fromarray(array), args.resolution)
        x = torch.from_numpy(np.asarray(sharp, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        y, kernel, field = degrade(x, name, args)
        row, tiles = [to_uint8(x), to_uint8(y)], [kernel_tile(kernel, args.resolution // 2)]
        if (name, "blurry", None) not in done:
            record = {"photo": name, "method": "blurry", "psnr": float(psnr(y, x)), "ssim": float(ssim(y, x))}
            if field is not None:
                record["tilt_rms"] = float(field.pow(2).mean().sqrt())
            add(record)
        for method, steps in runs:
            if (name, method, steps) in done:
                continue
            generator = torch.Generator().manual_seed(photo_seed(name, args.seed))
            start = time.time()
            image, k_hat, tilt = run_method(method, steps, y, kernel, pipes, args, generator)
            seconds = time.time() - start
            record = {"photo": name, "method": method, "steps": steps, "psnr": float(psnr(image, x)),
                      **({"precision": args.precision} if method.startswith("blind-dps") else {}),
                      "ssim": float(ssim(image, x)), "seconds": seconds, "resolution": args.resolution}
            if method != "oracle":
                record.update(mnc=float(mnc(k_hat, kernel)), kernel_mse=float(kernel_mse(k_hat, kernel)))
            if field is not None:
                record["tilt_rms"] = float(field.pow(2).mean().sqrt())
                if tilt is not None:
                    record["tilt_rmse"] = float((tilt.float() - field).pow(2).mean().sqrt())
            add(record)
            row.append(to_uint8(image))
            tiles.append(kernel_tile(k_hat, args.resolution // 2))
        if len(row) > 2:
            kernels = np.concatenate(tiles, axis=1)
            strip = np.concatenate(row, axis=1)
            canvas = np.zeros((strip.shape[0] + kernels.shape[0], max(strip.shape[1], kernels.shape[1]), 3), np.uint8)
            canvas[: strip.shape[0], : strip.shape[1]] = strip
            canvas[strip.shape[0]:, : kernels.shape[1]] = kernels
            Image.fromarray(canvas).save(args.output_dir / f"{name}.png")
        write_table(results, args.output_dir / "table.md")
    print(write_table(results, args.output_dir / "table.md"))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
