#!/usr/bin/env python
"""Copy a DvSR training export into the package as ``src/diffusers_blind/dvsr_default_model``.

The export (``<run>/export`` of ``scripts/train_dvsr.py``) is loaded as a pipeline and written with
``save_pretrained`` (safetensors), together with its ``training_info.json``. The model card
(``README.md``) already in the target folder is kept; an existing folder is replaced only with ``--force``.

    python scripts/build_dvsr_default_model.py runs/dvsr/export --force
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "src" / "diffusers_blind" / "dvsr_default_model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path)
    p.add_argument("--target", type=Path, default=TARGET)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    from diffusers_blind import StochasticRefinementDeblurPipeline

    if (args.target / "model_index.json").exists() and not args.force:
        raise SystemExit(f"{args.target} already holds a model; pass --force to replace it")
    card = (args.target / "README.md").read_text() if (args.target / "README.md").is_file() else None
    pipe = StochasticRefinementDeblurPipeline.from_pretrained(args.export)
    tmp = args.target.with_name(args.target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.copy2(args.export / "training_info.json", tmp / "training_info.json")
    if card is not None:
        (tmp / "README.md").write_text(card)
    index = json.loads((tmp / "model_index.json").read_text())
    index.pop("_name_or_path", None)  # a path of the training machine
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for f in tmp.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)  # safetensors may be written 0600
    shutil.rmtree(args.target, ignore_errors=True)
    tmp.rename(args.target)
    size = sum(f.stat().st_size for f in args.target.rglob("*") if f.is_file())
    print(f"[build_dvsr_default_model] {args.export} -> {args.target} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
