#!/usr/bin/env python
"""Convert an OpenAI guided-diffusion ``UNetModel`` checkpoint to a diffusers folder.

The DPS / BlindDPS / Fast Diffusion EM image prior (``ffhq_10m.pt``) and the BlindDPS kernel and
tilt priors are guided-diffusion UNets. This script maps their state dict onto a diffusers
:class:`~diffusers.UNet2DModel` and writes::

    OUTPUT_DIR/
        model_index.json                     # {"_class_name": "DDPMPipeline", ...}
        unet/config.json
        unet/diffusion_pytorch_model.safetensors
        scheduler/scheduler_config.json      # DDPMScheduler, linear betas 1e-4 .. 0.02, T = 1000

Usage::

    python scripts/convert_guided_diffusion_to_diffusers.py \\
        --checkpoint ffhq_10m.pt --config ffhq_dps --output_dir ffhq_10m_diffusers

The checkpoint must be a plain state dict (``torch.save(model.state_dict(), path)``); it is read
with ``torch.load(..., weights_only=True)``. Any preset value can be overridden on the command
line (``--image_size``, ``--num_channels``, ``--num_res_blocks``, ``--channel_mult``,
``--attention_resolutions``, ``--num_head_channels``, ``--num_heads``, ``--learn_sigma``,
``--in_channels`` ...), with guided-diffusion's own meaning and defaults.

Mapping (guided-diffusion → diffusers), with ``resblock_updown=True`` and ``use_scale_shift_norm=True``:

* ``time_embed.{0,2}`` → ``time_embedding.linear_{1,2}``; the sinusoidal embedding
  ``[cos, sin]`` with ``max_period=10000`` and frequencies ``exp(-log(1e4)·i/half)`` is diffusers'
  ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``.
* ``input_blocks.0.0`` → ``conv_in``; per level, ``num_res_blocks`` × (ResBlock [+ AttentionBlock])
  → ``down_blocks.L.resnets.i`` [+ ``attentions.i``]; the level's down-sampling ResBlock →
  ``down_blocks.L.downsamplers.0`` (a ``ResnetBlock2D(down=True)``: avg-pool inside the block).
* ``middle_block.{0,1,2}`` → ``mid_block.resnets.0``, ``mid_block.attentions.0``, ``mid_block.resnets.1``.
* ``output_blocks`` → ``up_blocks`` (``num_res_blocks + 1`` resnets per level, the up-sampling
  ResBlock → ``upsamplers.0``).
* ``out.0`` / ``out.2`` → ``conv_norm_out`` / ``conv_out``.
* ResBlock: ``in_layers.0/2`` → ``norm1/conv1``, ``emb_layers.1`` → ``time_emb_proj``,
  ``out_layers.0/3`` → ``norm2/conv2``, ``skip_connection`` → ``conv_shortcut``.
* AttentionBlock: ``norm`` → ``group_norm``; the 1×1 ``Conv1d`` ``qkv`` (3C, C, 1) is split into
  ``to_q/to_k/to_v`` following the head layout of ``QKVAttentionLegacy`` (per head ``[q; k; v]``,
  the default) or ``QKVAttention`` (``use_new_attention_order``: ``[q_all; k_all; v_all]``);
  ``proj_out`` → ``to_out.0``.

Levels with attention become ``AttnDownBlock2D`` / ``AttnUpBlock2D``, the others
``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D`` (``DownBlock2D`` / ``UpBlock2D`` with
``resblock_updown=False``, whose strided conv ``op`` / up-sampling ``conv`` map to
``downsamplers.0.conv`` / ``upsamplers.0.conv``). ``attn_norm_num_groups=32`` is required: with
``resnet_time_scale_shift="scale_shift"`` diffusers otherwise builds the middle attention without
its GroupNorm.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pathlib import Path

import torch


# --------------------------------------------------------------------------------------- configs
PRESETS: dict[str, dict[str, Any]] = {
    # DPS FFHQ prior `ffhq_10m.pt` (used by DPS, BlindDPS and Fast Diffusion EM): configs/model_config.yaml
    "ffhq_dps": dict(
        image_size=256, num_channels=128, num_res_blocks=1, channel_mult="", attention_resolutions="16",
        num_heads=4, num_head_channels=64, learn_sigma=True, in_channels=3,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
    ),
    # BlindDPS kernel prior: configs/kernel_model_config.yaml (grayscale 64x64 kernels)
    "blinddps_kernel": dict(
        image_size=64, num_channels=64, num_res_blocks=1, channel_mult="", attention_resolutions="16",
        num_heads=4, num_head_channels=64, learn_sigma=True, in_channels=1,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
    ),
    # BlindDPS tilt prior: configs/tilt_model_config.yaml (two-channel 256x256 tilt maps)
    "blinddps_tilt": dict(
        image_size=256, num_channels=64, num_res_blocks=1, channel_mult="", attention_resolutions="16",
        num_heads=4, num_head_channels=64, learn_sigma=True, in_channels=2,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
    ),
}

_DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def _parse_tuple(value, cast=int) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        return tuple(cast(float(p)) if cast is int else cast(p) for p in parts)
    return tuple(cast(v) for v in value)


def guided_diffusion_config(
    image_size: int = 64,
    num_channels: int = 128,
    num_res_blocks: int = 2,
    channel_mult: str | tuple = "",
    attention_resolutions: str | tuple = "16,8",
    num_heads: int = 4,
    num_head_channels: int = -1,
    learn_sigma: bool = False,
    in_channels: int = 3,
    out_channels: int | None = None,
    use_scale_shift_norm: bool = True,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    num_classes: int | None = None,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """A normalised guided-diffusion UNet configuration, as ``script_util.create_model`` would build it.

    The defaults are guided-diffusion's ``model_and_diffusion_defaults()``; the papers' models
    differ from them (see :data:`PRESETS`).

    ``channel_mult=""`` picks guided-diffusion's default for ``image_size``; ``attention_resolutions``
    are feature-map *resolutions* (``"16"`` = the 16×16 level), converted to down-sampling factors
    ``ds = image_size // res`` exactly as guided-diffusion does. ``num_head_channels != -1`` overrides
    ``num_heads``. ``out_channels`` defaults to ``in_channels`` (× 2 with ``learn_sigma``).
    For a preset with overrides: ``guided_diffusion_config(**{**PRESETS["ffhq_dps"], **overrides})``.
    """
    mult = _parse_tuple(channel_mult, float)
    if not mult:
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size}; pass channel_mult")
        mult = _DEFAULT_CHANNEL_MULT[image_size]
    mult = tuple(int(m) if float(m).is_integer() else float(m) for m in mult)
    resolutions = _parse_tuple(attention_resolutions, int)
    attention_ds = tuple(sorted({image_size // int(r) for r in resolutions}))
    if out_channels is None:
        out_channels = in_channels * 2 if learn_sigma else in_channels
    return dict(
        image_size=int(image_size),
        model_channels=int(num_channels),
        num_res_blocks=int(num_res_blocks),
        channel_mult=mult,
        attention_ds=attention_ds,
        num_heads=int(num_heads),
        num_head_channels=int(num_head_channels),
        learn_sigma=bool(learn_sigma),
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        use_scale_shift_norm=bool(use_scale_shift_norm),
        resblock_updown=bool(resblock_updown),
        use_new_attention_order=bool(use_new_attention_order),
        num_classes=None if num_classes is None else int(num_classes),
        dropout=float(dropout),
    )


def _level_channels(config: dict) -> list[int]:
    return [int(m * config["model_channels"]) for m in config["channel_mult"]]


def _level_has_attention(config: dict) -> list[bool]:
    return [2**level in config["attention_ds"] for level in range(len(config["channel_mult"]))]


def _attention_heads(channels: int, config: dict) -> int:
    if config["num_head_channels"] == -1:
        return config["num_heads"]
    if channels % config["num_head_channels"]:
        raise ValueError(f"{channels} channels are not a multiple of num_head_channels={config['num_head_channels']}")
    return channels // config["num_head_channels"]


def unet_config_from_guided(config: dict) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments equivalent to a :func:`guided_diffusion_config`."""
    channels = _level_channels(config)
    if channels[0] != config["model_channels"]:
        # diffusers sizes the sinusoidal embedding and the time MLP input by block_out_channels[0];
        # guided-diffusion by model_channels (they differ only for channel_mult[0] != 1, e.g. the 512 model).
        raise ValueError("channel_mult[0] must be 1: UNet2DModel ties the timestep-embedding width to the first level")
    attn = _level_has_attention(config)
    # UNet2DModel uses one attention_head_dim for every attention layer (down, mid, up).
    attn_channels = [c for c, a in zip(channels, attn) if a] + [channels[-1]]
    head_dims = {c // _attention_heads(c, config) for c in attn_channels}
    if config["num_head_channels"] != -1:
        attention_head_dim = config["num_head_channels"]
    elif config["num_heads"] == 1:
        attention_head_dim = None  # diffusers: one head of the full width in every block
    elif len(head_dims) == 1:
        attention_head_dim = head_dims.pop()
    else:
        raise ValueError(
            f"num_heads={config['num_heads']} with num_head_channels=-1 gives different head widths "
            f"{sorted(head_dims)} "
            "across attention levels; UNet2DModel supports a single attention_head_dim"
        )
    for c in attn_channels:
        if _attention_heads(c, config) * (attention_head_dim or c) != c:
            raise ValueError(f"cannot represent the attention heads of a {c}-channel level")
    updown = config["resblock_updown"]
    down_plain = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    up_plain = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    unet = dict(
        sample_size=config["image_size"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple("AttnDownBlock2D" if a else down_plain for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else up_plain for a in reversed(attn)),
        block_out_channels=tuple(channels),
        layers_per_block=config["num_res_blocks"],
        mid_block_type="UNetMidBlock2D",
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        dropout=config["dropout"],
        act_fn="silu",
        attention_head_dim=attention_head_dim,
        norm_num_groups=32,
        attn_norm_num_groups=32,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if config["use_scale_shift_norm"] else "default",
        add_attention=True,
    )
    if config["num_classes"] is not None:
        unet["num_class_embeds"] = config["num_classes"]
    return unet


def scheduler_config_from_guided(config: dict, variance_type: str | None = None) -> dict[str, Any]:
    """``DDPMScheduler`` keyword arguments for guided-diffusion's linear 1000-step schedule."""
    if variance_type is None:
        variance_type = "learned_range" if config["learn_sigma"] else "fixed_small"
    return dict(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance_type=variance_type,
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type="epsilon",
        timestep_spacing="linspace",
    )


# --------------------------------------------------------------------------------------- mapping
_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_OPTIONAL = {"skip_connection"}  # identity when the channel count does not change


def _module_plan(config: dict) -> list[tuple[str, str, str]]:
    """``(guided prefix, diffusers prefix, kind)`` for every parametrised module, in forward order."""
    plan = [
        ("time_embed.0", "time_embedding.linear_1", "layer"),
        ("time_embed.2", "time_embedding.linear_2", "layer"),
        ("input_blocks.0.0", "conv_in", "layer"),
    ]
    if config["num_classes"] is not None:
        plan.append(("label_emb", "class_embedding", "embedding"))
    nrb, levels, attn = config["num_res_blocks"], len(config["channel_mult"]), _level_has_attention(config)
    updown = config["resblock_updown"]
    idx = 1
    for level in range(levels):
        for i in range(nrb):
            plan.append((f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{i}", "resblock"))
            if attn[level]:
                plan.append((f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{i}", "attention"))
            idx += 1
        if level != levels - 1:
            if updown:
                plan.append((f"input_blocks.{idx}.0", f"down_blocks.{level}.downsamplers.0", "resblock"))
            else:
                plan.append((f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "layer"))
            idx += 1
    plan += [
        ("middle_block.0", "mid_block.resnets.0", "resblock"),
        ("middle_block.1", "mid_block.attentions.0", "attention"),
        ("middle_block.2", "mid_block.resnets.1", "resblock"),
    ]
    idx = 0
    for j, level in enumerate(reversed(range(levels))):
        for i in range(nrb + 1):
            plan.append((f"output_blocks.{idx}.0", f"up_blocks.{j}.resnets.{i}", "resblock"))
            sub = 1
            if attn[level]:
                plan.append((f"output_blocks.{idx}.1", f"up_blocks.{j}.attentions.{i}", "attention"))
                sub = 2
            if level and i == nrb:
                if updown:
                    plan.append((f"output_blocks.{idx}.{sub}", f"up_blocks.{j}.upsamplers.0", "resblock"))
                else:
                    plan.append((f"output_blocks.{idx}.{sub}.conv", f"up_blocks.{j}.upsamplers.0.conv", "layer"))
            idx += 1
    plan += [("out.0", "conv_norm_out", "layer"), ("out.2", "conv_out", "layer")]
    return plan


def _split_qkv(weight: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a ``(3C, ...)`` qkv tensor into q, k, v of ``(C, ...)`` in diffusers' head-major layout."""
    rest = weight.shape[1:]
    width = weight.shape[0] // 3
    if new_order:  # QKVAttention: [q (all heads); k; v]
        q, k, v = weight.chunk(3, dim=0)
    else:  # QKVAttentionLegacy: per head [q_h; k_h; v_h]
        w = weight.reshape(heads, 3, width // heads, *rest)
        q, k, v = (w[:, n].reshape(width, *rest) for n in range(3))
    return q.contiguous(), k.contiguous(), v.contiguous()


class ConversionError(ValueError):
    """The checkpoint does not match the requested guided-diffusion configuration."""


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Map a guided-diffusion ``UNetModel`` state dict onto ``UNet2DModel`` key names and shapes.

    Raises :class:`ConversionError` listing the missing and unexpected keys if the checkpoint does
    not have the layout implied by ``config`` (a :func:`guided_diffusion_config`).
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(key: str, optional: bool = False) -> torch.Tensor | None:
        if key in sd:
            used.add(key)
            return sd[key]
        if not optional:
            missing.append(key)
        return None

    for gd, df, kind in _module_plan(config):
        if kind == "layer":
            for p in ("weight", "bias"):
                t = take(f"{gd}.{p}")
                if t is not None:
                    out[f"{df}.{p}"] = t
        elif kind == "embedding":
            t = take(f"{gd}.weight")
            if t is not None:
                out[f"{df}.weight"] = t
        elif kind == "resblock":
            for gsub, dsub in _RESBLOCK.items():
                for p in ("weight", "bias"):
                    t = take(f"{gd}.{gsub}.{p}", optional=gsub in _OPTIONAL)
                    if t is not None:
                        out[f"{df}.{dsub}.{p}"] = t
        elif kind == "attention":
            for p in ("weight", "bias"):
                t = take(f"{gd}.norm.{p}")
                if t is not None:
                    out[f"{df}.group_norm.{p}"] = t
            for p in ("weight", "bias"):
                qkv = take(f"{gd}.qkv.{p}")
                if qkv is None:
                    continue
                if p == "weight":
                    qkv = qkv.reshape(qkv.shape[0], qkv.shape[1])  # Conv1d (3C, C, 1) -> Linear (3C, C)
                heads = _attention_heads(qkv.shape[0] // 3, config)
                q, k, v = _split_qkv(qkv, heads, config["use_new_attention_order"])
                out[f"{df}.to_q.{p}"], out[f"{df}.to_k.{p}"], out[f"{df}.to_v.{p}"] = q, k, v
            for p in ("weight", "bias"):
                t = take(f"{gd}.proj_out.{p}")
                if t is not None:
                    out[f"{df}.to_out.0.{p}"] = t.reshape(t.shape[0], -1) if p == "weight" else t
        else:  # pragma: no cover
            raise AssertionError(kind)

    unexpected = sorted(set(sd) - used)
    if missing or unexpected:
        raise ConversionError(_key_report(missing, unexpected, config))
    return out


def _key_report(missing: list[str], unexpected: list[str], config: dict, limit: int = 40) -> str:
    def fmt(keys):
        shown = "\n    ".join(keys[:limit])
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return shown + more

    msg = ["The checkpoint does not match the guided-diffusion configuration " + json.dumps(config, default=list)]
    if missing:
        msg.append(f"  missing keys ({len(missing)}):\n    {fmt(missing)}")
    if unexpected:
        msg.append(f"  unexpected keys ({len(unexpected)}):\n    {fmt(unexpected)}")
    msg.append(
        "  Check --num_res_blocks, --channel_mult, --attention_resolutions, --resblock_updown and "
        "--use_scale_shift_norm (they change the block indices)."
    )
    return "\n".join(msg)


def build_unet(state_dict: dict[str, torch.Tensor], config: dict, dtype: torch.dtype | None = torch.float32):
    """Convert ``state_dict`` and load it (strictly, shapes checked) into a new ``UNet2DModel``."""
    from diffusers import UNet2DModel

    converted = convert_state_dict(state_dict, config)
    with torch.device("meta"):
        unet = UNet2DModel(**unet_config_from_guided(config))
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {expected[k]}"
        for k, v in converted.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if bad_shapes or missing or unexpected:
        unet_config = json.dumps(unet_config_from_guided(config))
        parts = [f"The converted state dict does not fit UNet2DModel({unet_config})"]
        if bad_shapes:
            parts.append("  shape mismatches:\n    " + "\n    ".join(bad_shapes[:40]))
        if missing:
            parts.append("  missing:\n    " + "\n    ".join(missing[:40]))
        if unexpected:
            parts.append("  unexpected:\n    " + "\n    ".join(unexpected[:40]))
        raise ConversionError("\n".join(parts))
    if dtype is not None:
        converted = {k: v.to(dtype) for k, v in converted.items()}
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.eval()


# --------------------------------------------------------------------------------------- CLI
def _str2bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "t"):
        return True
    if v in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="guided-diffusion state dict (.pt)")
    p.add_argument("--config", choices=sorted(PRESETS), default=None, help="architecture preset")
    p.add_argument("--output_dir", required=True, help="a new or empty folder (an existing one only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing, non-empty --output_dir")
    p.add_argument("--image_size", type=int)
    p.add_argument("--num_channels", type=int)
    p.add_argument("--num_res_blocks", type=int)
    p.add_argument("--channel_mult", type=str, help='e.g. "1,1,2,2,4,4"; "" = guided-diffusion default')
    p.add_argument("--attention_resolutions", type=str, help='e.g. "32,16,8"')
    p.add_argument("--num_heads", type=int)
    p.add_argument("--num_head_channels", type=int)
    p.add_argument("--learn_sigma", type=_str2bool)
    p.add_argument("--in_channels", type=int, help="3 (RGB), 1 (grayscale kernel model), 2 (tilt model)")
    p.add_argument("--out_channels", type=int, help="default: in_channels, doubled with learn_sigma")
    p.add_argument("--use_scale_shift_norm", type=_str2bool)
    p.add_argument("--resblock_updown", type=_str2bool)
    p.add_argument("--use_new_attention_order", type=_str2bool)
    p.add_argument("--num_classes", type=int, help="class-conditional models (label_emb)")
    p.add_argument(
        "--variance_type", choices=["learned_range", "fixed_small", "fixed_large"],
        help="DDPMScheduler variance_type (default: learned_range if learn_sigma else fixed_small)",
    )
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    return p.parse_args(argv)


_OVERRIDES = (
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
    "num_head_channels", "learn_sigma", "in_channels", "out_channels", "use_scale_shift_norm",
    "resblock_updown", "use_new_attention_order", "num_classes",
)


def config_from_args(args: argparse.Namespace) -> dict:
    values = dict(PRESETS[args.config]) if args.config else {}
    values.update({k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None})
    return guided_diffusion_config(**values)


def check_output_dir(folder: Path, overwrite: bool) -> None:
    """Refuse, before the checkpoint is read, an output that is a file or a non-empty folder (unless ``overwrite``)."""
    if folder.exists() and not folder.is_dir():
        raise ConversionError(f"--output_dir {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ConversionError(f"--output_dir {folder} is not empty; choose a new folder, or pass --overwrite to "
                              "replace its model_index.json, unet/ and scheduler/")


def main(argv=None) -> int:
    from diffusers import DDPMPipeline, DDPMScheduler

    args = parse_args(argv)
    config = config_from_args(args)
    if not Path(args.checkpoint).is_file():
        raise ConversionError(f"checkpoint not found: {args.checkpoint}")
    check_output_dir(Path(args.output_dir), args.overwrite)
    try:
        state_dict = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # empty, truncated, not a torch file, or pickled code weights_only refuses
        detail = "empty or truncated" if isinstance(error, EOFError) else (
            "not plain tensors, or not a PyTorch file" if "weights only" in str(error).lower()
            else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}")
        raise ConversionError(f"{args.checkpoint} is not a readable PyTorch state-dict checkpoint ({detail}); "
                              "only plain tensor checkpoints are read, never pickled code") from None
    if not isinstance(state_dict, dict):
        raise ConversionError(f"{args.checkpoint} does not hold a state dict (got {type(state_dict).__name__})")
    def holds_weights(value) -> bool:  # a state dict of tensors (not, e.g., an EMA helper's own state)
        return isinstance(value, dict) and bool(value) and all(torch.is_tensor(v) for v in value.values())

    for wrapper in ("ema", "state_dict", "model"):  # tolerate {"state_dict": {...}} style files; EMA weights first
        if holds_weights(state_dict.get(wrapper)):
            others = [w for w in ("ema", "state_dict", "model") if w != wrapper and holds_weights(state_dict.get(w))]
            if others:
                print(f"note: {args.checkpoint} holds {', '.join([wrapper, *others])}; converting {wrapper!r}")
            state_dict = state_dict[wrapper]
            break
    unet = build_unet(state_dict, config, dtype=getattr(torch, args.dtype))
    scheduler = DDPMScheduler(**scheduler_config_from_guided(config, args.variance_type))
    # A DDPMPipeline folder: unet/ + scheduler/ + model_index.json, the layout of the Hub DDPM repos.
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(args.output_dir, safe_serialization=True)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"Saved UNet2DModel ({n_params:,} parameters) and DDPMScheduler to {args.output_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
