"""The files ``diffusers-blind deblur`` writes per input: names, the rerun rule, atomic writing.

Per input, in the output folder: ``<stem>_deblurred.png``; ``<stem>_kernel.npy`` and ``<stem>_kernel.png``
(enlarged preview) when the method returns a kernel; ``<stem>_uncertainty.npy/.png`` with particles;
``<stem>_tilt.npy`` (``(2, H, W)`` float32 in pixels) when the method returns a tilt field (turbulence);
``<stem>.json``, written last, which lists the files written and so marks the image as done.
Stems are the inputs' own, made unique (see :func:`output_stems`); no output may replace an input.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image

from .image_processor import kernel_to_image
from .io import save_image, save_npy, save_png16


OUTPUT_SUFFIXES = ("_deblurred", "_kernel", "_uncertainty")  # skipped when a folder of inputs is scanned
BLUR_FILES = {  # what `diffusers-blind blur -o <name>.png` writes beside <name>.png: the ground truth, named so
    "kernel_npy": "_true_kernel.npy",  # that a later `deblur` of <name>.png into the same folder never
    "kernel_png": "_true_kernel.png",  # replaces it (deblur writes <name>_kernel.*, <name>_tilt.npy, <name>.json)
    "tilt_npy": "_true_tilt.npy",
    "record": "_blur.json",
}
OUTPUT_FILES = {  # what deblur writes per input: name -> suffix after the output stem
    "image": "_deblurred.png",
    "kernel_png": "_kernel.png",
    "kernel_npy": "_kernel.npy",
    "uncertainty_png": "_uncertainty.png",
    "uncertainty_npy": "_uncertainty.npy",
    "tilt_npy": "_tilt.npy",
    "record": ".json",
}


def input_key(path) -> str:
    """An input's resolved path, case-normalised: how one run tells its inputs apart."""
    return os.path.normcase(str(Path(path).resolve()))


def input_digest(path) -> str:
    """SHA-256 of an input file's bytes: how a record names its input wherever the folder or the working folder
    has moved since."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_stems(paths: list[Path], claimed: dict[str, str] | None = None) -> list[str]:
    """One output stem per input, unique even ignoring case: the file stem, or ``stem_2``, ``stem_3``...
    for the second, third... input with that stem, skipping any name that another input already has
    (``photo.jpg``, ``photo.png`` and ``photo_2.png`` → ``photo``, ``photo_3``, ``photo_2``).

    ``claimed`` (:func:`claimed_stems`: :func:`input_key` of an input → the stem of its earlier record, plus the
    stems of records of other inputs) keeps a resumed run's names: an input keeps its earlier stem, and no other
    input gets a stem a record holds, so an image added to the folder never takes over another image's result.
    """
    claimed = claimed or {}
    keys = [input_key(path) for path in paths]
    fixed = {key: claimed[key] for key in keys if key in claimed}
    recorded = {stem.casefold() for stem in claimed.values()}
    taken = {path.stem.casefold() for path in paths} | recorded
    used = {stem.casefold() for stem in fixed.values()}
    stems = []
    for path, key in zip(paths, keys):
        if key in fixed:
            stems.append(fixed[key])
            continue
        stem = path.stem
        if stem.casefold() in used or stem.casefold() in recorded:
            number = 2
            while f"{stem}_{number}".casefold() in taken or f"{stem}_{number}".casefold() in used:
                number += 1
            stem = f"{stem}_{number}"
        used.add(stem.casefold())
        stems.append(stem)
    return stems


def record_is_for(record: dict, path: Path, digest: str | None = None) -> bool:
    """Whether a deblur record was made from the input ``path``: the same file content (its ``input_sha256``); for
    records of earlier versions, the same resolved path (``input_key``), or else the same file name."""
    if "input_sha256" in record:
        return record["input_sha256"] == (input_digest(path) if digest is None else digest)
    if "input_key" in record:
        return record["input_key"] == input_key(path)
    return Path(str(record.get("input", ""))).name == Path(path).name


def claimed_stems(out_dir: Path, paths: list[Path]) -> dict[str, str]:
    """The stems the deblur records (finished or not) in ``out_dir`` hold, for :func:`output_stems`: each record
    matched to one of ``paths`` (:func:`record_is_for`; an input matched once, an input of the record's own file
    name first, so a copy added beside a finished photo does not take its result) under that input's
    :func:`input_key`; the others under ``record:<stem>``, which no input has, so their stems stay theirs."""
    records = []
    for record_path in sorted(Path(out_dir).glob("*.json")) if Path(out_dir).is_dir() else []:
        if is_deblur_record(record_path):
            records.append((record_path.stem, json.loads(record_path.read_text())))
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            try:
                digests[path] = input_digest(path)
            except OSError:  # unreadable: it matches no record (the run reports it as unreadable)
                digests[path] = ""
        return digests[path]

    def matches(record: dict, path: Path) -> bool:
        return record_is_for(record, path, digest(path) if "input_sha256" in record else None)

    owners: dict[str, Path] = {}
    for same_name in (True, False):
        for stem, record in records:
            if stem in owners:
                continue
            recorded_name = Path(str(record.get("input", ""))).name
            for path in paths:
                if path not in owners.values() and (not same_name or path.name == recorded_name) \
                        and matches(record, path):
                    owners[stem] = path
                    break
    claims: dict[str, str] = {}
    for stem, _ in records:
        claims[input_key(owners[stem]) if stem in owners else f"record:{stem}"] = stem
    return claims


def plan_outputs(paths: list[Path], out_dir: Path, protected: list[Path],
                 claimed: dict[str, str] | None = None) -> list[dict[str, Path]]:
    """The files each input may get in ``out_dir`` (names as :func:`output_stems`); an error if one of them is an
    input (or ``protected``)."""
    plans = [{name: out_dir / f"{stem}{suffix}" for name, suffix in OUTPUT_FILES.items()}
             for stem in output_stems(paths, claimed)]
    inputs = {os.path.normcase(str(p.resolve())): p for p in [*paths, *protected]}
    seen: dict[str, Path] = {}
    for plan in plans:
        for file in plan.values():
            key = os.path.normcase(str(file.resolve()))
            if key in inputs:
                raise ValueError(f"the output {file} would overwrite the input {inputs[key]}; choose another -o folder")
            if key.casefold() in seen:  # cannot happen with output_stems; kept as a guard
                raise ValueError(f"two inputs would write the same output {file}")
            seen[key.casefold()] = file
    return plans


def incomplete_record(input_path: Path, plan: dict[str, Path], method: str) -> dict:
    """The record written before an image's files: it claims them (``status: incomplete``) until the final
    record replaces it, so files left by a crash are known as this tool's."""
    return {"input": str(input_path), "input_sha256": input_digest(input_path), "status": "incomplete",
            "settings": {"method": method},
            "outputs": {name: str(file) for name, file in plan.items() if name != "record"}}


def finished_record(plan: dict[str, Path]) -> dict | None:
    """The record of an earlier run that finished this input (valid JSON listing files that all exist), else ``None``."""
    try:
        record = json.loads(plan["record"].read_text())
        folder = plan["record"].parent  # the listed paths may be relative to another working folder
        if record.get("status") != "incomplete" and record["outputs"] and all((folder / Path(file).name).is_file() for file in record["outputs"].values()):
            return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def is_deblur_record(path: Path) -> bool:
    """``path`` is a ``<stem>.json`` that ``deblur`` wrote (finished or not): JSON with its ``input``,
    ``outputs`` and ``settings.method`` entries. A crash can leave such a record's files half written;
    anything else under that name belongs to someone else."""
    try:
        record = json.loads(path.read_text())
        return isinstance(record, dict) and "input" in record and isinstance(record.get("outputs"), dict) \
            and "method" in record.get("settings", {})
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def is_done(plan: dict[str, Path]) -> bool:
    """An earlier run finished this input (see :func:`finished_record`)."""
    return finished_record(plan) is not None


def settings_differences(record: dict, settings: dict) -> list[str]:
    """``"name: old -> new"`` for every setting of ``settings`` that the finished ``record`` has otherwise."""
    previous = record.get("settings", {})

    def same(key, value) -> bool:  # a known-kernel run records `guard: None` (not applied); older ones the default
        if key == "precision" and key not in previous:  # records from before a method had --precision ran float32
            return value == "float32"
        return previous.get(key) == value or (key == "guard" and value is None and settings.get("kernel_file"))

    return [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in settings.items() if not same(k, v)]


def uncertainty_image(std: np.ndarray) -> PIL.Image.Image:
    """The per-pixel std map scaled by its maximum to 8-bit grayscale (white = most uncertain)."""
    peak = float(std.max()) if std.size else 0.0
    scaled = std / peak if peak > 0 else np.zeros_like(std)
    return PIL.Image.fromarray((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), mode="L")


def write_outputs(plan: dict[str, Path], result, image: PIL.Image.Image, kernel_scale: int = 8,
                  bit_depth: int = 8) -> dict[str, Path]:
    """Write the image, kernel, uncertainty and tilt files atomically; returns those written.

    ``bit_depth`` 16 writes the image as a 16-bit PNG from ``result.image`` (a 16-bit input keeps its depth);
    8 writes the 8-bit ``image``.
    """
    import torch

    written = {"image": plan["image"]}
    if bit_depth == 16:
        restored = result.image.detach().float().clamp(0, 1).cpu().reshape(result.image.shape[-3:])
        save_png16(restored[0].numpy() if restored.shape[0] == 1 else restored.permute(1, 2, 0).numpy(), plan["image"])
    else:
        save_image(image, plan["image"])
    if result.kernel is not None:
        kernel = np.asarray(result.kernel.detach().float().cpu().reshape(result.kernel.shape[-2:]), dtype=np.float32)
        save_npy(kernel, plan["kernel_npy"])
        save_image(kernel_to_image(torch.from_numpy(kernel), scale=kernel_scale), plan["kernel_png"])
        written.update(kernel_npy=plan["kernel_npy"], kernel_png=plan["kernel_png"])
    if result.uncertainty is not None:
        std = np.asarray(result.uncertainty.detach().float().cpu().reshape(result.uncertainty.shape[-2:]), np.float32)
        save_image(uncertainty_image(std), plan["uncertainty_png"])
        save_npy(std, plan["uncertainty_npy"])
        written.update(uncertainty_png=plan["uncertainty_png"], uncertainty_npy=plan["uncertainty_npy"])
    tilt = getattr(result, "tilt", None)
    if tilt is not None:
        save_npy(np.asarray(tilt.detach().float().cpu().reshape(2, *tilt.shape[-2:]), np.float32), plan["tilt_npy"])
        written["tilt_npy"] = plan["tilt_npy"]
    return written


def remove_stale(plan: dict[str, Path], keep) -> None:
    """Delete the files of ``plan`` not named in ``keep`` (an earlier run's, which would look current)."""
    for name, file in plan.items():
        if name not in keep and file.is_file():
            file.unlink()
