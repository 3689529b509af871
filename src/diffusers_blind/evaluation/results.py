"""The per-job results file of an evaluation: ``results.jsonl`` (one JSON record per line), resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path


def job_key(record_or_job) -> tuple:
    if isinstance(record_or_job, dict):
        return int(record_or_job["image_index"]), record_or_job["method"], float(record_or_job["sigma"])
    index, sigma, method = record_or_job
    return int(index), method, float(sigma)


def read_records(output_dir: Path) -> list[dict]:
    """Every complete record of ``results.jsonl`` and ``results.rank*.jsonl`` (a truncated last line is ignored)."""
    records = []
    for path in [output_dir / "results.jsonl", *sorted(output_dir.glob("results.rank*.jsonl"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill: that job is redone
    return records


def merge_records(output_dir: Path, extra_records: list[dict]) -> list[dict]:
    """Deduplicate (first record of a job wins), sort, rewrite ``results.jsonl`` atomically, drop the rank files."""
    merged = {}
    for record in [*read_records(output_dir), *extra_records]:
        merged.setdefault(job_key(record), record)
    records = [merged[key] for key in sorted(merged, key=lambda k: (k[0], k[2], k[1]))]
    tmp = output_dir / "results.jsonl.tmp"
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, output_dir / "results.jsonl")
    for path in output_dir.glob("results.rank*.jsonl"):
        path.unlink()
    return records
