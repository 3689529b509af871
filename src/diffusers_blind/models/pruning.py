"""A narrower copy of a trained ``UNet2DModel``: the start of a distilled student (structured channel pruning).

The cost of the image prior's UNet is set by the widths of its first levels (docs/scale.md). A student with
narrower levels trained from random weights needs many steps to catch up with its teacher; started from the
teacher's own weights, restricted to the most important channels of each level, it starts close to the
teacher's function and distils several times faster.

Channels live in *spaces*: the outputs of a convolution, and every tensor added to them through an identity
shortcut (a ResNet block whose input and output widths match shares its input's space). Each space keeps the
channels whose producing weights (the output rows of every convolution writing into it) have the largest
L2 norm; every weight is then sliced to the kept output and input channels. Where the teacher adds a tensor
through an identity but the student's widths differ, the student's 1×1 shortcut is the embedding of the kept
channels, so kept channels pass exactly as in the teacher.

The sinusoidal time embedding has ``block_out_channels[0]`` entries; a student with half of them uses every
other frequency of the teacher's (``exp(−ln(10⁴)·i/h)`` for ``i < h``, so frequency ``i`` of the student is ``2i``
of the teacher), and its first linear layer takes the matching columns. The time MLP's width is kept.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict

import torch
from diffusers import UNet2DModel

SUPPORTED_DOWN = ("DownBlock2D",)
SUPPORTED_UP = ("UpBlock2D",)


def default_norm_groups(teacher_groups: int, widths) -> int:
    """The teacher's group count where it divides every new width, else their greatest common divisor with it."""
    common = math.gcd(teacher_groups, *widths)
    return teacher_groups if common == teacher_groups else common


class _Walk:
    """The UNet's tensors as labels ``(space, student width, teacher width)``, in forward order."""

    def __init__(self, weights: dict):
        self.weights = weights
        self.importance: dict[int, torch.Tensor] = defaultdict(lambda: 0)
        self.records: list[tuple[str, str, list, tuple]] = []
        self._count = 0

    def new_space(self) -> int:
        self._count += 1
        return self._count

    def produce(self, space: int, weight: torch.Tensor) -> None:
        self.importance[space] = self.importance[space] + weight.float().flatten(1).norm(dim=1)

    def keep(self, label) -> torch.Tensor:
        space, width, teacher_width = label
        if space is None:
            return torch.arange(width)
        return self.importance[space].topk(width).indices.sort().values

    def keep_concat(self, labels) -> torch.Tensor:
        parts, offset = [], 0
        for label in labels:
            parts.append(self.keep(label) + offset)
            offset += label[2]
        return torch.cat(parts)


def _trace(teacher: UNet2DModel, widths) -> _Walk:
    weights = teacher.state_dict()
    walk = _Walk(weights)
    teacher_widths = list(teacher.config.block_out_channels)
    in_channels, out_channels = teacher.config.in_channels, teacher.config.out_channels

    def conv(prefix, inputs, width, teacher_width):
        space = walk.new_space()
        walk.produce(space, weights[f"{prefix}.weight"])
        label = (space, width, teacher_width)
        walk.records.append((prefix, "conv", inputs, label))
        return label

    def resnet(prefix, inputs, width, teacher_width):
        identity = f"{prefix}.conv_shortcut.weight" not in weights
        space = inputs[0][0] if identity else walk.new_space()
        walk.produce(space, weights[f"{prefix}.conv2.weight"])
        if not identity:
            walk.produce(space, weights[f"{prefix}.conv_shortcut.weight"])
        label = (space, width, teacher_width)
        walk.records.append((prefix, "resnet", inputs, label))
        return label

    current = conv("conv_in", [(None, in_channels, in_channels)], widths[0], teacher_widths[0])
    skips = [current]
    for level, block in enumerate(teacher.down_blocks):
        for index in range(len(block.resnets)):
            current = resnet(f"down_blocks.{level}.resnets.{index}", [current], widths[level], teacher_widths[level])
            skips.append(current)
        if block.downsamplers is not None:
            current = conv(f"down_blocks.{level}.downsamplers.0.conv", [current], widths[level], teacher_widths[level])
            skips.append(current)
    for number, block in enumerate(teacher.up_blocks):
        level = len(widths) - 1 - number
        for index in range(len(block.resnets)):
            current = resnet(f"up_blocks.{number}.resnets.{index}", [current, skips.pop()], widths[level],
                             teacher_widths[level])
        if block.upsamplers is not None:
            current = conv(f"up_blocks.{number}.upsamplers.0.conv", [current], widths[level], teacher_widths[level])
    walk.records.append(("conv_norm_out", "norm", [current], current))
    walk.records.append(("conv_out", "conv", [current], (None, out_channels, out_channels)))
    return walk


def _slice(walk: _Walk, student_keys: set) -> dict:
    weights, sliced = walk.weights, {}
    for prefix, kind, inputs, output in walk.records:
        rows, cols = walk.keep(output), walk.keep_concat(inputs)
        if kind == "norm":
            for name in ("weight", "bias"):
                sliced[f"{prefix}.{name}"] = weights[f"{prefix}.{name}"][rows]
        elif kind == "conv":
            sliced[f"{prefix}.weight"] = weights[f"{prefix}.weight"][rows][:, cols]
            sliced[f"{prefix}.bias"] = weights[f"{prefix}.bias"][rows]
        else:
            for name in ("weight", "bias"):
                sliced[f"{prefix}.norm1.{name}"] = weights[f"{prefix}.norm1.{name}"][cols]
                sliced[f"{prefix}.norm2.{name}"] = weights[f"{prefix}.norm2.{name}"][rows]
                sliced[f"{prefix}.conv1.{name}"] = weights[f"{prefix}.conv1.{name}"][rows]
                sliced[f"{prefix}.conv2.{name}"] = weights[f"{prefix}.conv2.{name}"][rows]
                sliced[f"{prefix}.time_emb_proj.{name}"] = weights[f"{prefix}.time_emb_proj.{name}"][rows]
            sliced[f"{prefix}.conv1.weight"] = sliced[f"{prefix}.conv1.weight"][:, cols]
            sliced[f"{prefix}.conv2.weight"] = sliced[f"{prefix}.conv2.weight"][:, rows]
            if f"{prefix}.conv_shortcut.weight" in weights:
                sliced[f"{prefix}.conv_shortcut.weight"] = weights[f"{prefix}.conv_shortcut.weight"][rows][:, cols]
                sliced[f"{prefix}.conv_shortcut.bias"] = weights[f"{prefix}.conv_shortcut.bias"][rows]
            elif f"{prefix}.conv_shortcut.weight" in student_keys:  # an identity in the teacher
                embedding = (rows[:, None] == cols[None, :]).to(weights[f"{prefix}.conv1.weight"].dtype)
                sliced[f"{prefix}.conv_shortcut.weight"] = embedding[:, :, None, None]
                sliced[f"{prefix}.conv_shortcut.bias"] = torch.zeros(len(rows), dtype=embedding.dtype)
    return sliced


def _time_embedding(weights: dict, student_width: int) -> dict:
    """The first time-MLP layer on the student's sinusoid: every ``step``-th frequency of the teacher's."""
    linear = weights["time_embedding.linear_1.weight"]
    half_teacher, half_student = linear.shape[1] // 2, student_width // 2
    if half_teacher % half_student:
        raise ValueError(f"block_out_channels[0] = {student_width} must divide the teacher's {2 * half_teacher}")
    step = half_teacher // half_student
    columns = torch.cat([torch.arange(half_student) * step, half_teacher + torch.arange(half_student) * step])
    # the dropped frequencies' columns carry as much weight as the kept ones: scale to keep the output's size
    out = {"time_embedding.linear_1.weight": linear[:, columns] * step}
    for name in ("time_embedding.linear_1.bias", "time_embedding.linear_2.weight", "time_embedding.linear_2.bias"):
        out[name] = weights[name]
    return out


def prune_unet(teacher: UNet2DModel, block_out_channels, norm_num_groups: int | None = None) -> UNet2DModel:
    """A ``UNet2DModel`` of the teacher's architecture with narrower ``block_out_channels``, initialised from the
    teacher's most important channels (module docstring). The deepest width (the mid block's) must stay the
    teacher's, and its weights are copied; every other width may be at most the teacher's, and two neighbouring
    levels may be equal only where the teacher's are. ``norm_num_groups``: default :func:`default_norm_groups`;
    with fewer groups than the teacher, every GroupNorm pools more channels, the copied mid block's too, so no
    level computes exactly what the teacher's does. Pruning to the teacher's own widths returns an exact copy.
    """
    config = teacher.config
    if any(isinstance(width, bool) or not isinstance(width, numbers.Integral) for width in block_out_channels):
        raise ValueError(f"block_out_channels must be integers, got {list(block_out_channels)}")
    widths = [int(width) for width in block_out_channels]
    teacher_widths = list(config.block_out_channels)
    if len(widths) != len(teacher_widths):
        raise ValueError(f"block_out_channels needs {len(teacher_widths)} widths (the teacher's levels), got {widths}")
    if any(width < 1 or width > old for width, old in zip(widths, teacher_widths)) or widths[-1] != teacher_widths[-1]:
        raise ValueError(f"each width must be between 1 and the teacher's {teacher_widths}, and the last (the mid "
                         f"block's) equal to it; got {widths}")
    unsupported = [name for name in config.down_block_types if name not in SUPPORTED_DOWN] + \
        [name for name in config.up_block_types if name not in SUPPORTED_UP]
    if unsupported or config.class_embed_type is not None or config.num_class_embeds is not None \
            or config.time_embedding_type != "positional" \
            or config.resnet_time_scale_shift != "default":
        raise ValueError(f"pruning supports {SUPPORTED_DOWN + SUPPORTED_UP} blocks with a positional time embedding, "
                         "the default time shift and no class embedding; got "
                         f"{sorted(set(unsupported)) or (config.time_embedding_type, config.resnet_time_scale_shift)}")
    if widths[0] != teacher_widths[0] and widths[0] < 2:
        raise ValueError(f"block_out_channels[0] must be at least 2 (the sinusoid takes pairs of frequencies), got {widths[0]}")
    if widths[0] != teacher_widths[0] and config.freq_shift != 0:
        raise ValueError("a narrower first width takes every other frequency of the teacher's sinusoid, which needs "
                         f"freq_shift 0; this teacher has {config.freq_shift}: keep block_out_channels[0]")
    for level in range(1, len(widths)):  # a projection in the teacher cannot become the student's identity
        if teacher_widths[level - 1] != teacher_widths[level] and widths[level - 1] == widths[level]:
            raise ValueError(f"widths {widths[level - 1]} and {widths[level]} of levels {level - 1} and {level} are equal "
                             f"where the teacher's ({teacher_widths[level - 1]}, {teacher_widths[level]}) differ: the "
                             "teacher's learned shortcut has no place in the student")
    if norm_num_groups is not None and (isinstance(norm_num_groups, bool) or not isinstance(norm_num_groups, numbers.Integral)
                                        or norm_num_groups < 1):
        raise ValueError(f"norm_num_groups must be an integer >= 1, got {norm_num_groups!r}")
    groups = default_norm_groups(config.norm_num_groups, widths) if norm_num_groups is None else int(norm_num_groups)
    if any(width % groups for width in widths):
        raise ValueError(f"norm_num_groups {groups} must divide every width {widths}")
    student_config = {key: value for key, value in config.items() if not key.startswith("_")}
    student_config.update(block_out_channels=widths, norm_num_groups=groups,
                          time_embedding_dim=teacher.time_embedding.linear_1.out_features)
    student = UNet2DModel(**student_config)
    walk = _trace(teacher, widths)
    weights = _slice(walk, set(student.state_dict()))
    weights.update(_time_embedding(walk.weights, widths[0]))
    weights.update({key: value for key, value in walk.weights.items() if key.startswith("mid_block.")})
    student.load_state_dict(weights, strict=True)
    return student if student.dtype == teacher.dtype else student.to(teacher.dtype)
