"""Tiled UNet evaluation: any image size in bounded memory, transparent to the guided samplers.

The UNet prediction of an image larger than a tile is computed on overlapping tiles (in batches)
and blended with smooth weights at every diffusion step (MultiDiffusion-style averaging,
Bar-Tal et al. 2023, Eq. 5, with tapered instead of flat weights):

    f(x) = Σ_i W_i ⊙ P_i^T u(P_i x),      W_i = w_i / Σ_j P_j^T w_j,

where ``P_i`` crops tile ``i``, ``u`` is the UNet and ``w_i`` a separable raised-cosine window
that falls towards the tile edges that lie inside the image (where the UNet's zero padding makes
its prediction unreliable) and stays 1 on the image border. The scheduler step, the noise, the
guidance and the kernel M-step stay global: only the network is tiled, so noise is drawn for the
whole image once and results do not depend on the tile size beyond the UNet's own receptive field.

Guided samplers differentiate through the UNet (Pi-GDM: ``∇_{x_t}(G · x̂0)``). :class:`TiledApply`
is an ``autograd.Function`` whose forward runs the tiles under ``no_grad`` and whose backward
recomputes one batch of tiles at a time with autograd and accumulates the weighted
vector-Jacobian products ``Σ_i P_i^T J_iᵀ (W_i ⊙ g)`` (activation checkpointing per tile batch):
peak memory is one batch of tiles' forward+backward graph plus a few full-image tensors.

docs/scale.md has the measurements (memory and time against megapixels, seams).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from ..models.windowed_attention import check_attention_window, windowed_attention
from .pipeline_utils import UNetDenoiser


# Peak memory of one UNet forward+backward, in bytes per input pixel and per "activation channel"
# (Σ_l c_l·(layers_per_block+1)/4^l over the UNet levels, see `activation_channels`), float32 on CPU.
# Calibrated on the shipped default model (docs/scale.md); GPU kernels use somewhat less.
BYTES_PER_PIXEL_CHANNEL = 90.0
# Memory per padded image pixel that does not tile (state, x̂0, guidance and M-step FFTs, scheduler).
FULL_IMAGE_BYTES_PER_PIXEL = 400.0
# Share of the free memory the automatic setting plans for (the rest: the OS, other processes, slack).
AUTO_MEMORY_FRACTION = 0.6
# Largest tile the automatic setting uses; also the largest side run untiled. Beyond it the shipped
# UNet's time per pixel grows (42 µs per pixel forward+backward up to 384², 59 µs at 512²; docs/scale.md).
AUTO_MAX_TILE = 384
# Beyond AUTO_MAX_TILE² pixels the relative cost per pixel grows by one per this many more pixels
# (fitted to the two figures above: 42 µs → 59 µs from 384² to 512²): the mid-block attention.
ATTENTION_COST_PIXELS = 284_000
MIN_TILE = 32
MAX_TILE_BATCH = 8  # on a GPU, where batching tiles fills the device
CPU_MAX_TILE_BATCH = 1  # on a CPU: batches of 2 tiles cost 25 % more CPU time (page faults of >32 MiB buffers)

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value) -> int:
    """Bytes from an int/float (bytes) or a string such as ``"8GiB"``, ``"8GB"``, ``"512MiB"``, ``"2e9"``."""
    if isinstance(value, bool):
        raise ValueError(f"max_memory must be a number of bytes or a size such as '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"max_memory must be a size such as '8GiB', '8GB' or '512MiB', got {value!r}")
        try:
            number = float(match.group(1)) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"max_memory must be a size such as '8GiB', got {value!r}") from None
    else:
        raise ValueError(f"max_memory must be a number of bytes or a size such as '8GiB', got {value!r}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return int(number)


def available_memory(device) -> int:
    """Free memory in bytes where ``device`` computes: CUDA's free memory, else the free RAM (psutil or /proc)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with accelerate; /proc on Linux otherwise
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def processes_sharing(device) -> int:
    """How many processes of this launch (``accelerate launch``, ``torchrun``: ``LOCAL_WORLD_SIZE``) share
    ``device``'s memory: all of them on the CPU, those mapped to the same GPU on CUDA."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return max(1, math.ceil(local / max(1, torch.cuda.device_count())))
    return local


def automatic_budget(device) -> int:
    """``AUTO_MEMORY_FRACTION`` of the free memory of ``device``, divided among the processes sharing it."""
    return int(AUTO_MEMORY_FRACTION * available_memory(device) / processes_sharing(device))


def activation_channels(unet) -> float:
    """``Σ_l c_l (layers_per_block + 1) / 4^l``: the UNet's activations per input pixel, up to a constant."""
    config = unet.config
    layers = int(getattr(config, "layers_per_block", 1)) + 1
    return sum(c * layers / 4**level for level, c in enumerate(config.block_out_channels))


def unet_bytes_per_pixel(unet) -> float:
    """Estimated peak bytes of one UNet forward+backward per input pixel and sample (scaled for dtype)."""
    dtype = getattr(unet, "dtype", torch.float32)
    scale = torch.finfo(dtype).bits / 32 if dtype.is_floating_point else 1.0
    return BYTES_PER_PIXEL_CHANNEL * activation_channels(unet) * max(scale, 0.5)


# ---------------------------------------------------------------------------------------------- layout
def tile_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Starts of tiles of ``tile`` pixels covering ``[0, length)`` with at least ``overlap`` shared pixels.

    Evenly spread, each start a multiple of ``multiple`` (the UNet's down-sampling factor, so every tile
    sees the same pixel grid phase), the last one at ``length − tile``.
    """
    if tile >= length:
        return [0]
    stride = max(tile - overlap, multiple)
    count = math.ceil((length - tile) / stride) + 1
    last = length - tile
    starts = [int(round(i * last / (count - 1) / multiple)) * multiple for i in range(count)]
    starts[-1] = last
    return sorted(set(starts))


def _ramp(n: int, device) -> torch.Tensor:
    """Weights over an overlap of ``n`` pixels, rising from 0 to 1: 0 on the first quarter (the tile edge,
    where the UNet sees its zero padding), ``sin²`` over the middle half, 1 on the last quarter.

    A tile's rise and its neighbour's fall (the same ramp reversed) sum to 1 over the overlap.
    """
    u = torch.arange(n, device=device, dtype=torch.float64) + 0.5
    s = ((u - n / 4) / (n / 2)).clamp(0, 1)
    return torch.sin(math.pi / 2 * s) ** 2


def axis_weights(starts: list[int], tile: int, length: int, device) -> torch.Tensor:
    """Normalised 1-D blending weights, ``(len(starts), tile)``: tile ``i`` times ``a_i / Σ_j a_j``.

    ``a_i`` is 1, falling to 0 (``_ramp``) over the overlap with the previous (next) tile at its start
    (end); on the image border it stays 1. The products of the row and column weights are the 2-D
    weights ``W_i``; they sum to 1 at every pixel, and are 0 within a quarter of the overlap from any
    tile edge inside the image, so a network whose receptive field is smaller than that gives
    exactly its untiled output.
    """
    raw = torch.ones(len(starts), tile, dtype=torch.float64, device=device)
    for i, start in enumerate(starts):
        if i > 0:
            before = starts[i - 1] + tile - start
            raw[i, :before] *= _ramp(before, device)
        if i + 1 < len(starts):
            after = start + tile - starts[i + 1]
            raw[i, tile - after:] *= _ramp(after, device).flip(0)
    total = torch.zeros(length, dtype=torch.float64, device=device)
    for i, start in enumerate(starts):
        total[start:start + tile] += raw[i]
    return torch.stack([raw[i] / total[start:start + tile] for i, start in enumerate(starts)])


@dataclass
class TileLayout:
    """Overlapping tiles of a ``height × width`` image and their blending weights.

    Args:
        height, width: the (padded) image size.
        tile_height, tile_width: the tile size (the image size along an axis that fits in one tile).
        row_starts, col_starts: tile origins; the tiles are their product, row-major.
        batch_size: tiles evaluated together (each with all the samples of the batch).
        checkpoint: recompute the tiles in the backward pass (bounded memory); ``False`` keeps every
            tile's graph from the forward pass (one UNet forward less per step, memory of all the tiles).
    """

    height: int
    width: int
    tile_height: int
    tile_width: int
    row_starts: list[int]
    col_starts: list[int]
    batch_size: int = 1
    checkpoint: bool = True

    @classmethod
    def create(cls, height: int, width: int, tile_size: int, overlap: int, multiple: int = 8,
               batch_size: int = 1, checkpoint: bool = True) -> "TileLayout":
        if tile_size < multiple or not 0 <= overlap <= tile_size // 2:
            raise ValueError(f"need tile_size >= {multiple} and 0 <= overlap <= tile_size / 2, "
                             f"got tile_size={tile_size}, overlap={overlap}")
        tile_height, tile_width = min(tile_size, height), min(tile_size, width)
        return cls(height, width, tile_height, tile_width, tile_starts(height, tile_height, overlap, multiple),
                   tile_starts(width, tile_width, overlap, multiple), max(1, int(batch_size)), checkpoint)

    @property
    def tiles(self) -> list[tuple[int, int, int, int]]:
        """``(row_index, col_index, top, left)`` of every tile."""
        return [(r, c, top, left) for r, top in enumerate(self.row_starts) for c, left in enumerate(self.col_starts)]

    @property
    def num_tiles(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def batches(self) -> list[list[tuple[int, int, int, int]]]:
        tiles = self.tiles
        return [tiles[i:i + self.batch_size] for i in range(0, len(tiles), self.batch_size)]

    def weights(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row weights ``(rows, tile_height)`` and column weights ``(cols, tile_width)``."""
        return (axis_weights(self.row_starts, self.tile_height, self.height, device),
                axis_weights(self.col_starts, self.tile_width, self.width, device))

    def gather(self, x: torch.Tensor, batch) -> torch.Tensor:
        """The tiles of ``batch`` from ``x (N, C, H, W)`` as ``(len(batch)·N, C, th, tw)``, tile-major."""
        th, tw = self.tile_height, self.tile_width
        return torch.cat([x[..., top:top + th, left:left + tw] for _, _, top, left in batch])

    def tile_weights(self, batch, rows: torch.Tensor, cols: torch.Tensor, samples: int, dtype) -> torch.Tensor:
        """``W_i`` of each tile of ``batch``, ``(len(batch)·samples, 1, th, tw)``."""
        weights = torch.stack([rows[r][:, None] * cols[c][None, :] for r, c, _, _ in batch])
        return weights.to(dtype).repeat_interleave(samples, dim=0)[:, None]

    def scatter_add(self, target: torch.Tensor, values: torch.Tensor, batch) -> None:
        """Add tile ``values`` ``(len(batch)·N, C, th, tw)`` into ``target (N, C, H, W)`` at their places."""
        th, tw = self.tile_height, self.tile_width
        for chunk, (_, _, top, left) in zip(values.chunk(len(batch)), batch):
            target[..., top:top + th, left:left + tw] += chunk

    def blend(self, fn, x: torch.Tensor) -> torch.Tensor:
        """``Σ_i W_i ⊙ P_iᵀ fn(P_i x)``, one batch of tiles at a time (differentiable under autograd)."""
        rows, cols = self.weights(x.device)
        output = None
        for batch in self.batches():
            tiles = fn(self.gather(x, batch))
            if output is None:
                output = torch.zeros(x.shape[0], tiles.shape[1], self.height, self.width, device=x.device,
                                     dtype=tiles.dtype)
            self.scatter_add(output, tiles * self.tile_weights(batch, rows, cols, x.shape[0], tiles.dtype), batch)
        return output


class TiledApply(torch.autograd.Function):
    """``y = layout.blend(fn, x)`` with a memory-bounded backward.

    Forward: every tile under ``no_grad`` (nothing kept but ``x``). Backward: each batch of tiles is
    recomputed with autograd and ``∂L/∂x = Σ_i P_iᵀ J_iᵀ (W_i ⊙ P_i ∂L/∂y)`` is accumulated, so only
    one batch's graph is alive at a time. ``fn`` must be deterministic (a UNet in eval mode is) and is
    differentiated with respect to its input only (the parameters get no gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn, layout: TileLayout) -> torch.Tensor:
        ctx.fn, ctx.layout = fn, layout
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x)
        with torch.no_grad():
            return layout.blend(fn, x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        layout, fn = ctx.layout, ctx.fn
        device_type, enabled, dtype = ctx.autocast  # recompute under the forward's autocast state
        rows, cols = layout.weights(x.device)
        grad = torch.zeros_like(x)
        for batch in layout.batches():
            tiles = layout.gather(x.detach(), batch).requires_grad_(True)
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                output = fn(tiles)
                weighted = layout.gather(grad_output, batch) * layout.tile_weights(batch, rows, cols, x.shape[0],
                                                                                  grad_output.dtype)
                (tile_grad,) = torch.autograd.grad(output, tiles, weighted.to(output.dtype))
            layout.scatter_add(grad, tile_grad.to(grad.dtype), batch)
        return grad, None, None


def tiled_apply(fn, x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """``fn`` applied tile by tile and blended (differentiable in ``x`` with bounded memory when ``x`` needs grad)."""
    if x.requires_grad and torch.is_grad_enabled():
        return TiledApply.apply(x, fn, layout) if layout.checkpoint else layout.blend(fn, x)
    with torch.no_grad():
        return layout.blend(fn, x)


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class TilingPlan:
    """What :func:`plan_tiling` chose and why.

    Args:
        tile_size: the tile side, or ``None`` to run the UNet on the whole image.
        overlap: pixels shared by neighbouring tiles.
        batch_size: tiles per UNet call.
        checkpoint: recompute the tiles in the backward pass (else every tile's graph is kept).
        budget: the memory budget in bytes (0 when none was set).
        reason: one line for logs and records.
    """

    tile_size: int | None
    overlap: int = 0
    batch_size: int = 1
    checkpoint: bool = True
    budget: int = 0
    reason: str = ""

    def layout(self, height: int, width: int, multiple: int) -> TileLayout | None:
        if self.tile_size is None or (self.tile_size >= height and self.tile_size >= width):
            return None
        return TileLayout.create(height, width, self.tile_size, self.overlap, multiple, self.batch_size,
                                 self.checkpoint)


def default_overlap(tile_size: int, multiple: int = 8) -> int:
    """Pixels shared by neighbouring tiles: an eighth of the tile, at least 32, a multiple of ``multiple``.

    The tiled prediction's error against the untiled one does not shrink with a wider overlap (it
    comes from each tile's own normalisation statistics, docs/scale.md), so the overlap only needs to
    hide the tile edges: a quarter of it gets zero weight, a half is the raised-cosine blend.
    """
    return min(tile_size // 2, max(32, (tile_size // 8) // multiple * multiple))


def _tiled_pixels(height: int, width: int, tile: int, overlap: int, multiple: int) -> int:
    layout = TileLayout.create(height, width, tile, overlap, multiple)
    return layout.num_tiles * layout.tile_height * layout.tile_width


def relative_unet_cost(pixels: int) -> float:
    """Forward+backward time of one UNet call on ``pixels`` pixels, in units of a pixel's time at ≤ ``AUTO_MAX_TILE``²."""
    return pixels * (1 + max(0, pixels - AUTO_MAX_TILE**2) / ATTENTION_COST_PIXELS)


def untiled_is_cheaper(height: int, width: int, multiple: int) -> bool:
    """Whether one call on the whole (padded) image costs less than ``AUTO_MAX_TILE`` tiles covering it: tiles
    overlap, so they run more pixels, and win only where the attention's superlinear cost outgrows that."""
    if max(height, width) <= AUTO_MAX_TILE:
        return True
    tiled = _tiled_pixels(height, width, AUTO_MAX_TILE, default_overlap(AUTO_MAX_TILE, multiple), multiple)
    return relative_unet_cost(height * width) <= tiled


def plan_tiling(unet, shape, device, tile_size: int | None = None, max_memory=None, overlap: int | None = None,
                multiple: int = 8) -> TilingPlan:
    """Choose how to run a UNet forward+backward on latents of ``shape = (N, C, H, W)`` (padded) within memory.

    The budget is ``max_memory`` (bytes or ``"8GiB"``), or ``AUTO_MEMORY_FRACTION`` of the free memory
    of ``device`` (RAM on CPU, free GPU memory on CUDA) shared among the processes of a launch that use it. The estimate is ``FULL_IMAGE_BYTES_PER_PIXEL``
    per image pixel (what never tiles) plus ``unet_bytes_per_pixel`` per pixel the UNet runs on at once.

    * ``tile_size`` given: tiles of that size (rounded down to ``multiple``); none when it covers the image.
    * ``tile_size=None`` (automatic): untiled when it fits and one call costs less than ``AUTO_MAX_TILE``
      tiles (:func:`untiled_is_cheaper`: always for sides up to ``AUTO_MAX_TILE``, and for every square canvas
      up to 584 px); else the largest tile (≤ ``AUTO_MAX_TILE``, steps of 32) whose forward+backward fits next to
      the full-image tensors.

    Tiles per batch: as many as fit (1 to ``MAX_TILE_BATCH`` on CUDA, ``CPU_MAX_TILE_BATCH`` elsewhere); the tiles' graphs are kept from the
    forward pass when all of them fit (``checkpoint=False``), else recomputed batch by batch.
    Raises ``ValueError`` when an explicit ``max_memory`` cannot hold the full-image tensors and one
    ``MIN_TILE`` tile.
    """
    samples, _, height, width = shape
    explicit = max_memory is not None
    budget = parse_memory(max_memory) if explicit else automatic_budget(device)
    per_pixel = unet_bytes_per_pixel(unet) * samples
    fixed = FULL_IMAGE_BYTES_PER_PIXEL * samples * height * width
    free = budget - fixed
    reason = f"{budget / 2**30:.1f} GiB budget" + ("" if explicit else " (automatic)")
    if tile_size is not None:
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < multiple:
            raise ValueError(f"tile_size must be an int >= {multiple} (the UNet's size multiple) or None, "
                             f"got {tile_size!r}")
        tile = tile_size // multiple * multiple
        if tile >= max(height, width):
            return TilingPlan(None, reason="tile_size covers the image")
        reason = f"tile_size {tile} given; {reason}"
    elif per_pixel * height * width <= free and untiled_is_cheaper(height, width, multiple):
        return TilingPlan(None, budget=budget, reason=f"fits untiled; {reason}")
    else:
        tile = AUTO_MAX_TILE
        while tile > MIN_TILE and per_pixel * tile * tile > free:
            tile -= 32
        tile = max(tile, MIN_TILE) // multiple * multiple
        if per_pixel * tile * tile > free:
            message = (f"a memory budget of {budget / 2**30:.2f} GiB cannot hold a {height}x{width} image "
                       f"(~{fixed / 2**30:.2f} GiB of full-image tensors) and one {tile}x{tile} UNet tile "
                       f"(~{per_pixel * tile * tile / 2**30:.2f} GiB)")
            if explicit:
                raise ValueError(message + "; raise max_memory, or use fewer particles or a smaller image")
            reason = message + "; trying the smallest tile anyway"
        if tile >= max(height, width):
            return TilingPlan(None, budget=budget, reason=f"fits untiled; {reason}")
    lap = default_overlap(tile, multiple) if overlap is None else overlap
    cap = MAX_TILE_BATCH if torch.device(device).type == "cuda" else CPU_MAX_TILE_BATCH
    batch = int(max(1, min(cap, free // (per_pixel * tile * tile))))
    checkpoint = per_pixel * _tiled_pixels(height, width, tile, lap, multiple) > free
    return TilingPlan(tile, lap, batch, checkpoint, budget, reason)


# ---------------------------------------------------------------------------------------------- denoiser
class TiledUNetDenoiser(UNetDenoiser):
    """A :class:`UNetDenoiser` whose UNet runs on overlapping tiles (see the module docstring).

    ``layout=None`` is the plain denoiser. Everything downstream (ε, x̂0, the scheduler step, the
    guidance's vector-Jacobian product) is unchanged: only ``model_output`` is tiled.

    Example:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=16, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        >>> layout = TileLayout.create(48, 40, tile_size=32, overlap=16, multiple=2)
        >>> denoiser = TiledUNetDenoiser(unet, DDPMScheduler(), layout)
        >>> denoiser(torch.zeros(1, 3, 48, 40), 999).x0.shape, layout.num_tiles
        (torch.Size([1, 3, 48, 40]), 4)
    """

    def __init__(self, unet, scheduler, layout: TileLayout | None = None, autocast_dtype: torch.dtype | None = None,
                 attention_window: int | None = None):
        super().__init__(unet, scheduler)
        check_attention_window(attention_window)
        self.layout = layout
        self.autocast_dtype = autocast_dtype
        self.attention_window = attention_window

    def unet_output(self, model_input: torch.Tensor, t) -> torch.Tensor:
        if self.autocast_dtype is not None and self.autocast_dtype != model_input.dtype:
            with torch.autocast(model_input.device.type, dtype=self.autocast_dtype):
                return self._tiled_output(model_input, t).to(model_input.dtype)
        return self._tiled_output(model_input, t)

    def _tiled_output(self, model_input: torch.Tensor, t) -> torch.Tensor:
        def run(tiles):
            with windowed_attention(self.unet, self.attention_window, *tiles.shape[-2:]):
                return self.unet(tiles, t).sample

        return run(model_input) if self.layout is None else tiled_apply(run, model_input, self.layout)


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# accelerate's names (``--mixed_precision``) and "no" for the same three settings
PRECISION_ALIASES = {"no": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast is faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bfloat16(device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 / AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bfloat16()


def auto_precision(device) -> str:
    """``"bfloat16"`` where ``device`` computes it natively (faster, same quality: docs/scale.md), else ``"float32"``."""
    return "bfloat16" if native_bfloat16(device) else "float32"


def default_precision(device) -> str:
    """``"float32"``. bfloat16 autocast is 18 % faster on a CPU with native bfloat16 and kept the example's
    PSNR (docs/scale.md), but a batch of images then no longer equals the images run one by one (bf16
    matrix products depend on the batch shape), so it is opt-in: ``precision="bfloat16"``."""
    return "float32"


def resolve_precision(precision: str | None, device="cpu") -> torch.dtype | None:
    """The UNet's autocast dtype for ``precision`` (``None``: :func:`default_precision`; ``"auto"``:
    :func:`auto_precision`); ``None`` means no autocast."""
    name = default_precision(device) if precision is None else precision
    if isinstance(name, str):
        name = PRECISION_ALIASES.get(name.strip().lower(), name.strip().lower())
    if name == "auto":
        name = auto_precision(device)
    if not isinstance(name, str) or name not in PRECISIONS:
        raise ValueError(f"precision must be one of {(*PRECISIONS, *PRECISION_ALIASES, 'auto')} or None, got {precision!r}")
    return PRECISIONS[name]


def make_denoiser(unet, scheduler, shape, device, tile_size: int | None = None, max_memory=None,
                  multiple: int = 8, autocast_dtype: torch.dtype | None = None,
                  attention_window: int | None = None,
                  plan_sides: tuple[int, int] | None = None) -> tuple[TiledUNetDenoiser, TilingPlan]:
    """The denoiser a pipeline should use for latents of ``shape`` (padded), and the plan behind it.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the UNet's forward and backward under autocast; its
    output is cast back to the latents' dtype, so the scheduler, the guidance and the M-step stay in float32.
    ``attention_window`` (pixels) restricts the UNet's self-attention to windows of that size
    (:mod:`..models.windowed_attention`). The tiling plan does not depend on it: large sides are still tiled,
    which bounds the memory. ``plan_sides`` (default: ``shape``'s) are the sides the plan is made for, when the
    latents were padded beyond them (Fast EM's FFT-friendly sides); the tiles cover ``shape``.
    """
    plan_shape = shape if plan_sides is None else (*shape[:2], *plan_sides)
    plan = plan_tiling(unet, plan_shape, device, tile_size, max_memory, multiple=multiple)
    layout = plan.layout(shape[-2], shape[-1], multiple)
    return TiledUNetDenoiser(unet, scheduler, layout, autocast_dtype, attention_window), plan
