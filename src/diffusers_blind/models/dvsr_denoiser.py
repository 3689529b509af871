"""The small conditional denoiser ``f(z_t, noise level, y)`` of Deblurring via Stochastic Refinement."""

from __future__ import annotations

from diffusers import UNet2DModel


def build_dvsr_denoiser(
    image_channels: int = 3,
    block_out_channels: tuple[int, ...] = (24, 48, 96),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
) -> UNet2DModel:
    """A fully convolutional ``UNet2DModel`` for ``f``: input ``[z_t, y]`` (``2·C`` channels, y concatenated as in SR3), output ``ε̂`` (``C``).

    No attention anywhere (``DownBlock2D`` / ``UpBlock2D``, ``add_attention=False``), so any size that
    is a multiple of ``2^(levels-1)`` runs. The timestep input carries the continuous noise level
    (see :class:`~diffusers_blind.schedulers.ContinuousNoiseLevelScheduler`); ``UNet2DModel``'s
    sinusoidal embedding accepts float timesteps.
    """
    levels = len(block_out_channels)
    return UNet2DModel(
        sample_size=None,
        in_channels=2 * image_channels,
        out_channels=image_channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        layers_per_block=layers_per_block,
        add_attention=False,
        norm_num_groups=norm_num_groups,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
    )
