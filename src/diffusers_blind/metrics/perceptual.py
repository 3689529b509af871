"""Optional perceptual metrics (LPIPS, FID, NIQE, BRISQUE) that need extra packages or downloaded weights.

None of them is needed by the package. Each wrapper uses what is installed and already on disk,
never downloads silently, and otherwise raises :class:`MetricUnavailableError` with what to
install or where to put the weights (docs/conventions.md, "Metrics"):

* **LPIPS** (``lpips``): ``torchvision`` + the ImageNet backbone checkpoint (``alexnet-owt-7be5be79.pth``
  for ``net="alex"``) in ``$TORCH_HOME/hub/checkpoints`` (see ``torch.hub.get_dir()``); the small
  LPIPS linear heads ship inside ``torchmetrics``.
* **FID** (``fid``): ``torch-fidelity`` + ``weights-inception-2015-12-05-6726825d.pth`` in the same folder.
* **NIQE**: built in and offline (:mod:`diffusers_blind.metrics.niqe_offline`, pristine model fitted on the
  training photographs); ``niqe_pyiqa`` uses ``pyiqa`` and its MATLAB parameter file when present.
* **BRISQUE** (``brisque``): the ``brisque`` package (ships its SVM model; needs ``scikit-image``,
  ``libsvm-official`` and ``opencv-python-headless``): ``pip install brisque opencv-python-headless``.

Set ``DIFFUSERS_BLIND_ALLOW_DOWNLOADS=1`` to let LPIPS/FID fetch missing weights on a connected machine.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from .image import _unit_range


class MetricUnavailableError(RuntimeError):
    """An optional metric cannot run here; the message says what to install or where to put weights."""


_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
_INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{_INCEPTION_FILE}"


def _downloads_allowed() -> bool:
    return os.environ.get("DIFFUSERS_BLIND_ALLOW_DOWNLOADS", "") in ("1", "true", "yes")


def _checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` float32 in ``[0, 1]``: integer levels rescaled, other ranges refused (as :func:`psnr`)."""
    x = _unit_range(x, "image", None)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, C, H, W) or (C, H, W) with 1 or 3 channels, got {tuple(x.shape)}")
    x = x.float().clamp(0, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ---------------------------------------------------------------------------------------------- LPIPS
@functools.lru_cache(maxsize=None)
def _lpips_model(net: str):
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"net must be one of {tuple(_LPIPS_BACKBONES)}, got {net!r}")
    if not _has_module("torchvision"):
        raise MetricUnavailableError(
            "LPIPS needs torchvision (`pip install torchvision` matching your torch) and the ImageNet "
            f"{net} backbone weights in {_checkpoint_dir()}."
        )
    import torchvision

    weights = getattr(torchvision.models, _LPIPS_BACKBONES[net]).DEFAULT
    filename = weights.url.rsplit("/", 1)[-1]
    if not (_checkpoint_dir() / filename).is_file() and not _downloads_allowed():
        raise MetricUnavailableError(
            f"LPIPS-{net} needs the backbone weights {filename} in {_checkpoint_dir()} (not found). Download "
            f"{weights.url} on a connected machine and copy it there (or set TORCH_HOME), or set "
            "DIFFUSERS_BLIND_ALLOW_DOWNLOADS=1 to let torchvision fetch it."
        )
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    try:
        model = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True, reduction="none")
    except Exception as error:  # a corrupt file, an incompatible torchvision, ...
        raise MetricUnavailableError(f"LPIPS-{net} could not be built: {error}") from error
    return model.eval()


def lpips(x: torch.Tensor, y: torch.Tensor, net: str = "alex") -> torch.Tensor:
    """LPIPS distance per image (``(B,)``, lower is better) on ``[0, 1]`` images (torchmetrics, ``normalize=True``).

    The DPS/BlindDPS/Fast EM papers use ``net="vgg"``; ``"alex"`` is the LPIPS authors' default.
    Grayscale images are repeated to 3 channels. Raises :class:`MetricUnavailableError` offline.
    """
    model = _lpips_model(net)
    x, y = _as_batch(x), _as_batch(y)
    model.to(x.device)
    with torch.no_grad():
        values = torch.stack([model(x[i : i + 1], y[i : i + 1]).reshape(()) for i in range(x.shape[0])])
    model.reset()
    return values.double().cpu()


# ---------------------------------------------------------------------------------------------- FID
def _check_fid():
    if not _has_module("torch_fidelity"):
        raise MetricUnavailableError(
            f"FID needs torch-fidelity (`pip install torch-fidelity`, which needs torchvision) and the Inception "
            f"weights {_INCEPTION_FILE} in {_checkpoint_dir()}."
        )
    if not (_checkpoint_dir() / _INCEPTION_FILE).is_file() and not _downloads_allowed():
        raise MetricUnavailableError(
            f"FID needs the Inception weights {_INCEPTION_FILE} in {_checkpoint_dir()} (not found). Download "
            f"{_INCEPTION_URL} on a connected machine and copy it there, or set DIFFUSERS_BLIND_ALLOW_DOWNLOADS=1."
        )


def fid(real, fake, batch_size: int = 32) -> float:
    """Fréchet Inception distance between two sets of ``[0, 1]`` images (``(N, C, H, W)`` tensors or lists of them).

    torchmetrics' ``FrechetInceptionDistance(feature=2048, normalize=True)`` (torch-fidelity's
    Inception). A dataset-level number: meaningful only for hundreds of images or more.
    """
    _check_fid()
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=True)
    except Exception as error:
        raise MetricUnavailableError(f"FID could not be built: {error}") from error
    for images, is_real in ((real, True), (fake, False)):
        images = torch.cat([_as_batch(t) for t in images]) if isinstance(images, (list, tuple)) else _as_batch(images)
        for start in range(0, images.shape[0], batch_size):
            metric.update(images[start : start + batch_size], real=is_real)
    return float(metric.compute())


# ---------------------------------------------------------------------------------------------- NIQE
@functools.lru_cache(maxsize=None)
def _niqe_model():
    if not _has_module("pyiqa"):
        raise MetricUnavailableError(
            "NIQE needs pyiqa (`pip install pyiqa`, heavy) and its NIQE parameter file "
            "(niqe_modelparameters.mat, fetched by pyiqa on first use) in pyiqa's cache folder."
        )
    import pyiqa

    try:
        return pyiqa.create_metric("niqe", device=torch.device("cpu"))
    except Exception as error:
        raise MetricUnavailableError(
            f"NIQE (pyiqa) could not be built, probably because its parameter file is missing offline: {error}"
        ) from error


def niqe_pyiqa(x: torch.Tensor) -> torch.Tensor:
    """NIQE per image (``(B,)``, no reference, lower is better) via pyiqa. Raises :class:`MetricUnavailableError` offline."""
    model = _niqe_model()
    x = _as_batch(x).cpu()
    with torch.no_grad():
        return torch.stack([model(x[i : i + 1]).reshape(()) for i in range(x.shape[0])]).double()


# ---------------------------------------------------------------------------------------------- BRISQUE
@functools.lru_cache(maxsize=None)
def _brisque_model():
    missing = [name for name in ("brisque", "skimage", "libsvm", "cv2") if not _has_module(name)]
    if missing:
        raise MetricUnavailableError(
            f"BRISQUE needs the `brisque` package and its dependencies (missing modules: {', '.join(missing)}): "
            "`pip install brisque opencv-python-headless` (pulls scikit-image and libsvm-official; the model ships inside)."
        )
    try:
        from brisque import BRISQUE

        model = BRISQUE(url=False)
    except Exception as error:
        raise MetricUnavailableError(f"BRISQUE could not be loaded: {error}") from error
    probe = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    try:  # brisque 0.2.0 fails with NumPy >= 2 (float() of a 1-element array): detect it once, here
        float(model.score(probe))
    except Exception as error:
        raise MetricUnavailableError(
            f"the installed brisque package fails on a test image ({type(error).__name__}: {error}); "
            "brisque 0.2.0 is known to need NumPy < 2 (`float()` of 1-element arrays)."
        ) from error
    return model


def brisque(x: torch.Tensor) -> torch.Tensor:
    """BRISQUE score per image (``(B,)``, no reference, lower is better, typically 0-100) via the ``brisque`` package.

    Images are quantised to 8 bits (as the package expects) before scoring.
    """
    model = _brisque_model()
    x = _as_batch(x).cpu()
    arrays = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return torch.tensor([float(model.score(array)) for array in arrays], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- registry
def _check_offline_niqe():
    from .niqe_offline import load_niqe_model

    try:
        load_niqe_model()
    except OSError as error:  # the shipped pristine model is missing from this installation
        raise MetricUnavailableError(f"NIQE needs its pristine model file, which is missing: {error}") from error


def niqe(x: torch.Tensor) -> torch.Tensor:
    """NIQE per image (``(B,)``, no reference, lower is better), offline: see :mod:`diffusers_blind.metrics.niqe_offline`."""
    from .niqe_offline import niqe as offline_niqe

    return offline_niqe(_as_batch(x))


OPTIONAL_METRICS = {
    "lpips": lambda: _lpips_model("alex"),
    "fid": _check_fid,
    "niqe": _check_offline_niqe,
    "niqe_pyiqa": _niqe_model,
    "brisque": _brisque_model,
}


def metric_status(name: str) -> str | None:
    """``None`` if the optional metric ``name`` works here, else the reason it does not."""
    try:
        OPTIONAL_METRICS[name]()
    except MetricUnavailableError as error:
        return str(error)
    return None


def available_metrics() -> list[str]:
    """The metrics that work on this machine: the built-in ones plus the optional ones whose packages/weights are present."""
    builtin = ["psnr", "ssim", "gmsd", "laplacian_sharpness", "kernel_mse", "mnc", "reblur_loss"]
    return builtin + [name for name in OPTIONAL_METRICS if metric_status(name) is None]
