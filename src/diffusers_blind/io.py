"""Files in and out: one image reader, atomic writes, writable-folder checks.

Every file the package writes (PNG, NPY, JSON, CSV, text) goes through :func:`atomic_write`: the data
is written to a temporary name in the same folder, flushed to disk (``fsync``) and renamed over the
target with ``os.replace``. A crash or a full disk leaves either the old file or the new one, never a
truncated one (only a ``.*.tmp`` file that the next write replaces).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

from .image_processor import DeblurImageProcessor


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file and the reason."""


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Read an image file as float32 ``(H, W)`` or ``(H, W, 3)`` in ``[0, 1]`` and its PIL mode.

    Decoding is [`DeblurImageProcessor.decode_pil`], the one the pipelines use for PIL input (EXIF
    orientation, 16-bit and float modes, alpha dropped). Values slightly outside ``[0, 1]`` are clipped.
    Images larger than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                sixteen_bit_colour = _is_16bit_colour(image)
                levels = 65535.0 if _is_16bit_integer(image) else None
                if not sixteen_bit_colour:  # 16-bit colour is decoded below, in two passes of its own
                    image.load()
                    array = DeblurImageProcessor.decode_pil(image, name=str(path), integer_levels=levels)
                mode = "I;16" if levels is not None else image.mode
                frames = getattr(image, "n_frames", 1)
            if sixteen_bit_colour:
                array = _read_16bit_colour(path)
                mode = f"{mode};16"
        if frames > 1:
            warnings.warn(f"{path} holds {frames} frames (an animation or a multi-page file); only the first is used",
                          stacklevel=2)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise ImageReadError(
            f"cannot read image {path}: too large to decode safely ({error}). Downscale or crop it first "
            "(or raise PIL.Image.MAX_IMAGE_PIXELS in Python if you trust the file)"
        ) from None
    except MemoryError:
        raise ImageReadError(f"cannot read image {path}: not enough memory to decode it") from None
    except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError, EOFError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from None
    return np.clip(array, 0.0, 1.0), mode


# ---------------------------------------------------------------------------- 16-bit files
def _tile_rawmodes(image: PIL.Image.Image) -> list[tuple[str, object, object]]:
    """``(codec, rawmode, args)`` of every tile of a not yet loaded image: how Pillow will decode it."""
    return [(tile[0], tile[3] if isinstance(tile[3], str) else (tile[3][0] if tile[3] else None), tile[3])
            for tile in getattr(image, "tile", None) or []]


def _is_16bit_integer(image: PIL.Image.Image) -> bool:
    """Whether a single-channel ``I`` image holds 16-bit samples (a 16-bit PNG/PGM/TIFF), so ``÷ 65535``.

    Pillow opens such files as 32-bit ``I``; its tile says what the file declared: a ``I;16*`` raw mode,
    or a PGM whose maximum value is above 255 (which Pillow rescales to ``[0, 65535]``).
    """
    if image.mode != "I":
        return False
    for codec, rawmode, args in _tile_rawmodes(image):
        if str(rawmode).startswith("I;16"):
            return True
        if codec in ("ppm", "ppm_plain") and isinstance(args, tuple) and len(args) > 1 and args[1] > 255:
            return True
    return False


def _is_16bit_colour(image: PIL.Image.Image) -> bool:
    """Whether an ``RGB``/``RGBA`` image comes from 16-bit samples, which Pillow reduces to their high byte."""
    rawmodes = [rawmode for _, rawmode, _ in _tile_rawmodes(image)]
    return (image.mode in ("RGB", "RGBA") and bool(rawmodes)
            and all(isinstance(r, str) and r.split(";")[0] in ("RGB", "RGBA", "RGBX")
                    and r.endswith((";16B", ";16L", ";16N")) for r in rawmodes))  # not LA;16B (grey + alpha)


def _swapped_endianness(args):
    """A tile's decoder arguments with the 16-bit raw mode read in the other byte order (the low byte)."""
    def swap(rawmode: str) -> str:
        order = {"N": "L" if sys.byteorder == "little" else "B"}.get(rawmode[-1], rawmode[-1])
        return rawmode[:-1] + ("L" if order == "B" else "B")
    return swap(args) if isinstance(args, str) else (swap(args[0]),) + tuple(args[1:])


def _read_16bit_colour(path: Path) -> np.ndarray:
    """A 16-bit RGB(A) file as float32 ``(H, W, 3)`` at full precision.

    Pillow has no 16-bit colour mode: it unpacks each sample's high byte. Decoding the file a second
    time with the raw mode's byte order swapped yields the low bytes, and ``(256·high + low) / 65535``
    is the sample. Both passes get the file's EXIF orientation.
    """
    planes = []
    for swap in (False, True):
        with PIL.Image.open(path) as image:
            if swap:
                image.tile = [tile._replace(args=_swapped_endianness(tile[3])) for tile in image.tile]
            image.load()
            planes.append(np.asarray(PIL.ImageOps.exif_transpose(image).convert("RGB"), dtype=np.float32))
    high, low = planes
    return (high * 256.0 + low) / 65535.0


def is_16bit_mode(mode: str) -> bool:
    """Whether :func:`read_image`'s ``mode`` names 16-bit samples (``I;16*``, ``RGB;16``, ``RGBA;16``)."""
    return mode.startswith("I;16") or mode.endswith(";16")


def save_png16(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``(H, W)`` or ``(H, W, 3)`` values in ``[0, 1]`` as a 16-bit PNG, atomically.

    Grey through Pillow (mode ``I;16``); colour chunk by chunk (Pillow cannot write 16-bit colour): an ``IHDR``
    of bit depth 16, colour type 2, the big-endian rows each behind filter byte 0, deflated into one ``IDAT``.
    """
    import struct
    import zlib

    samples = np.round(np.clip(np.asarray(array, dtype=np.float64), 0.0, 1.0) * 65535).astype(">u2")
    if samples.ndim == 2:
        buffer = io.BytesIO()
        PIL.Image.fromarray(samples.astype(np.uint16)).save(buffer, format="PNG")  # uint16 → mode I;16
        data = buffer.getvalue()
    elif samples.ndim == 3 and samples.shape[2] == 3:
        height, width = samples.shape[:2]
        rows = np.concatenate([np.zeros((height, 1), np.uint8), samples.reshape(height, -1).view(np.uint8)], axis=1)

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

        data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))
    else:
        raise ValueError(f"save_png16 takes (H, W) or (H, W, 3) arrays, got {np.shape(array)}")
    with atomic_write(path) as handle:
        handle.write(data)


# ---------------------------------------------------------------------------- atomic writes
def file_mode(path: str | os.PathLike) -> int:
    """The permission bits a new file at ``path`` gets from ``open``: the existing file's, else ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    The file gets the permissions a plain ``open`` would give it (those of the file it replaces, else
    ``0o666`` less the umask), not the owner-only mode of temporary files.
    """
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, file_mode(path))
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


def save_image(image: PIL.Image.Image, path: str | os.PathLike, format: str = "PNG") -> None:
    """Write a PIL image atomically (PNG unless ``format`` says otherwise)."""
    buffer = io.BytesIO()
    text = {k: v for k, v in image.info.items() if k.startswith("diffusers_blind") and isinstance(v, str)}
    if text and format.upper() == "PNG":  # e.g. the mark of a kernel preview (image_processor.kernel_to_image)
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        image.save(buffer, format=format, pnginfo=info)
    else:
        image.save(buffer, format=format)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    """``np.save`` atomically (no pickles)."""
    with atomic_write(path) as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def save_json(data, path: str | os.PathLike) -> None:
    """JSON with two-space indent and a final newline, written atomically."""
    save_text(json.dumps(data, indent=2) + "\n", path)


def save_text(text: str, path: str | os.PathLike) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object from ``path``; an empty, truncated or non-object file raises ``ValueError`` naming it."""
    path = Path(path)
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"{what} {path} is empty (an earlier run was probably killed while writing it)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error}); it was probably cut short") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} does not hold a JSON object")
    return data


def check_writable_folder(folder: str | os.PathLike, create: bool = False) -> Path:
    """Prove a file can be written in ``folder`` (or, if it does not exist yet, in the nearest existing
    parent, where it would be created); ``OSError`` with a clear message if not. ``create`` makes it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OSError(f"output must be a folder, but {folder} is a file")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is a file")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-test-", delete=True):
            pass
        if create:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(f"cannot write to the output folder {folder}: {reason}") from None
    return folder


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding pixels; ``ImageReadError`` for files
    that are not images or exceed the decompression-bomb limit."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                size = image.size
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise ImageReadError(
            f"cannot read image {path}: too large to decode safely ({error}). Downscale or crop it first "
            "(or raise PIL.Image.MAX_IMAGE_PIXELS in Python if you trust the file)"
        ) from None
    except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError, EOFError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from None
    if size[0] == 0 or size[1] == 0:
        raise ImageReadError(f"cannot read image {path}: it is empty ({size[0]}x{size[1]} pixels)")
    return size


def check_training_folder(output_dir: str | os.PathLike, resume, checkpoints: str = "checkpoint-*") -> None:
    """Refuse to start a fresh training run in a folder that holds an earlier run's checkpoints.

    Without ``--resume`` a new run would interleave its logs, exports and checkpoints with the old ones
    (and the checkpoint limit could delete the new ones first). ``checkpoints``: the glob of the
    checkpoint folders below ``output_dir``.
    """
    if resume:
        return
    def step(folder: Path) -> int:
        digits = folder.name.rpartition("-")[2]
        return int(digits) if digits.isdigit() else -1

    found = sorted(Path(output_dir).glob(checkpoints), key=step)  # checkpoint-10 after checkpoint-9
    if found:
        raise SystemExit(f"{output_dir} holds checkpoints of an earlier run ({found[-1].name}, {len(found)} in all): "
                         "pass --resume latest to continue it, or choose another --output_dir")
