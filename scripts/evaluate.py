#!/usr/bin/env python
"""Evaluate blind-deblurring methods on a dataset: synthetic blur + noise, restore, score, summarise.

Single process::

    python scripts/evaluate.py --data_dir my_images/ --resolution 256 --limit 100 \\
        --methods fastem-pigdm pigdm-known-kernel wiener-known-kernel identity \\
        --sigma 5 10 --output_dir eval_out

Several processes (GPUs, or CPU cores with ``--cpu``), same results whatever the process count::

    accelerate launch --num_processes 4 scripts/evaluate.py --data_dir my_images/ ... --output_dir eval_out

Every (image, method, σ) job is appended to ``OUT/results.jsonl`` (one file per process while
running, ``OUT/results.rank{r}.jsonl``, merged at the end) as soon as it finishes; running the same
command again skips the jobs already done. The kernel and the noise of image ``i`` (and the seed of
the diffusion sampler) are pure functions of ``(--seed, i)``. See docs/evaluation.md.

This script is a thin entry point: the code is in the package, ``diffusers_blind.evaluation``
(also runnable as ``python -m diffusers_blind.evaluation``), and the methods come from the
registry ``diffusers_blind.methods``.
"""

import sys

from diffusers_blind.evaluation.runner import main


if __name__ == "__main__":
    sys.exit(main())
