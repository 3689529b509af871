"""Spatial self-attention restricted to windows of the size a UNet was trained on.

The shipped image priors are trained on 64×64 crops: their mid-block attention (at 1/8 of the
resolution) never attended over more than 8×8 positions. Run on a whole photograph it attends over
all of them at once: 41×41 positions for the README's 256² example with its margin, 1 681² scores per
head. That costs time quadratic in the pixels, and it shows the network a context it never saw.

:class:`WindowedAttnProcessor` splits the ``h × w`` grid of positions into ``rows × cols`` windows of
nearly equal size (``torch.tensor_split``) and lets each position attend only within its window:

    Attn(Q, K, V)_i = softmax(q_i K_Wᵀ / √d) V_W,   W = the window holding position i.

The convolutions around the attention still mix neighbouring windows. ``rows = ⌊H / window⌋`` for an
input of ``H`` pixels, the same at every level of the UNet, so a window covers ``window`` to
``2·window`` pixels of the input whatever the level's downsampling: never less context than the network
was trained with. With one window per axis (an input smaller than twice the window) the result is
exactly the global attention.

:func:`windowed_attention` installs the processor on every ``Attention`` of a ``UNet2DModel`` for the
duration of a ``with`` block and restores the previous processors afterwards.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


def windows_per_axis(size: int, window: int) -> int:
    """``max(1, ⌊size / window⌋)``: how many windows split an input side of ``size`` pixels (each at least
    ``window`` pixels wide)."""
    return max(1, size // window)


def check_attention_window(window) -> None:
    """``None`` (global attention) or a positive integer number of pixels."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(f"attention_window must be None or a positive int (pixels), got {window!r}")


def resolve_attention_window(setting, unet) -> int | None:
    """A pipeline's ``attention_window`` setting in pixels: ``"auto"`` is the UNet's training size
    (``unet.config.sample_size``, the smaller side of a pair), ``None`` global attention, an int itself."""
    setting = attention_window_setting(setting)
    if setting == "auto":
        size = getattr(unet.config, "sample_size", None)
        if isinstance(size, (list, tuple)):
            size = min(size)
        return int(size) if isinstance(size, numbers.Integral) and not isinstance(size, bool) and size > 0 else None
    return setting


def attention_window_setting(setting):
    """The setting as a pipeline stores it in its config: ``"auto"``, ``None`` or a plain ``int`` (JSON); anything
    else is refused."""
    if isinstance(setting, str):
        if setting != "auto":
            raise ValueError(f"attention_window must be 'auto', None or a positive int (pixels), got {setting!r}")
        return setting
    check_attention_window(setting)
    return None if setting is None else int(setting)


class WindowedAttnProcessor:
    """Self-attention of a spatial ``(B, C, h, w)`` map within ``rows × cols`` windows (see the module docstring).

    Anything else (a sequence input, cross-attention, an attention mask, a spatial norm) goes to ``fallback``,
    the processor it replaced, unchanged.
    """

    def __init__(self, rows: int, cols: int, fallback):
        self.rows, self.cols, self.fallback = rows, cols, fallback

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        if (hidden_states.ndim != 4 or encoder_hidden_states is not None or attention_mask is not None
                or attn.spatial_norm is not None or (self.rows == 1 and self.cols == 1)):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        tokens = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        head_dim = query.shape[-1] // attn.heads

        def grid(x):  # (B, h·w, heads·d) -> (B, heads, h, w, d)
            return x.reshape(batch, height, width, attn.heads, head_dim).permute(0, 3, 1, 2, 4)

        query, key, value = grid(query), grid(key), grid(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = torch.cat([
            torch.cat([self._window(q, k, v, attn.scale)
                       for q, k, v in zip(*(x.tensor_split(min(self.cols, width), dim=3) for x in (q_row, k_row, v_row)))],
                      dim=3)
            for q_row, k_row, v_row in zip(*(x.tensor_split(min(self.rows, height), dim=2) for x in (query, key, value)))
        ], dim=2)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, height * width, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _window(query, key, value, scale) -> torch.Tensor:
        """Attention among the positions of one ``(B, heads, h', w', d)`` window."""
        shape = query.shape
        out = F.scaled_dot_product_attention(query.flatten(2, 3), key.flatten(2, 3), value.flatten(2, 3), scale=scale)
        return out.reshape(shape)


@contextlib.contextmanager
def windowed_attention(unet: torch.nn.Module, window: int | None, height: int, width: int):
    """Within the block, every ``Attention`` of ``unet`` attends within windows of about ``window`` pixels of an
    ``height × width`` input (nothing changes for ``window=None`` or an input that fits in one window)."""
    check_attention_window(window)
    rows = 1 if window is None else windows_per_axis(height, window)
    cols = 1 if window is None else windows_per_axis(width, window)
    modules = [module for module in unet.modules() if isinstance(module, Attention)] if rows * cols > 1 else []
    previous = [module.processor for module in modules]
    try:
        for module, processor in zip(modules, previous):
            module.set_processor(WindowedAttnProcessor(rows, cols, processor))
        yield
    finally:
        for module, processor in zip(modules, previous):
            module.set_processor(processor)
