"""Evaluation of deblurring methods on a dataset: synthetic blur + noise, restore, score, summarise.

Modules: ``degradations`` (reproducible kernels and noise, crops, the blur models), ``runner`` (settings,
the resumable per-job loop, scores), ``summary`` (``summary.csv`` / ``summary.md``) and ``figures``
(``grid.png``, the perception-distortion plot). Run it with ``python -m diffusers_blind.evaluation``,
``python scripts/evaluate.py`` or ``accelerate launch scripts/evaluate.py``; see docs/evaluation.md.
Methods come from the registry ``diffusers_blind.methods``.
"""

from .degradations import blur, degrade, load_scene, make_kernel, stream_seed
from .runner import main, parse_args, run_method, score


__all__ = ["blur", "degrade", "load_scene", "main", "make_kernel", "parse_args", "run_method", "score", "stream_seed"]
