"""Structured pruning of a trained UNet2DModel into a narrower student (diffusers_blind.models.pruning)."""

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_blind.models.pruning import default_norm_groups, prune_unet


def teacher(widths=(8, 16, 32, 32), layers_per_block=1, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=widths,
                  layers_per_block=layers_per_block, norm_num_groups=4, attention_head_dim=8,
                  down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths))
    config.update(overrides)
    model = UNet2DModel(**config)
    with torch.no_grad():  # non-trivial biases and norms, so that a wrong slice shows
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def outputs(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    with torch.no_grad():
        return model(x, torch.tensor([3, 700])).sample


@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_pruning_to_the_teachers_own_widths_is_an_exact_copy(layers_per_block):
    model = teacher(layers_per_block=layers_per_block)
    copy = prune_unet(model, model.config.block_out_channels)
    assert copy.config.norm_num_groups == 4
    assert torch.equal(outputs(copy), outputs(model))


def test_a_pruned_student_keeps_the_teachers_most_important_channels():
    model = teacher()
    student = prune_unet(model, (4, 8, 16, 32))
    assert list(student.config.block_out_channels) == [4, 8, 16, 32] and student.config.norm_num_groups == 4
    assert student.time_embedding.linear_1.out_features == model.time_embedding.linear_1.out_features
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in model.parameters())
    assert outputs(student).shape == (2, 3, 16, 16) and torch.isfinite(outputs(student)).all()
    # the first level's kept channels are the teacher's, unchanged, chosen by the weight norms of the two
    # convolutions that write into that space (conv_in, and the identity-shortcut block after it)
    norms = model.conv_in.weight.flatten(1).norm(dim=1) + model.down_blocks[0].resnets[0].conv2.weight.flatten(1).norm(dim=1)
    kept = norms.topk(4).indices.sort().values
    assert torch.equal(student.conv_in.weight, model.conv_in.weight[kept])
    # the deepest level (the mid block) is copied whole
    assert torch.equal(student.mid_block.resnets[0].conv1.weight, model.mid_block.resnets[0].conv1.weight)
    # an identity shortcut of the teacher (32 -> 32 at the last level) becomes the embedding of the kept channels
    shortcut = student.down_blocks[3].resnets[0].conv_shortcut.weight[:, :, 0, 0]
    assert model.down_blocks[3].resnets[0].conv_shortcut is None
    assert shortcut.shape == (32, 16) and torch.equal(shortcut.sum(0), torch.ones(16)) and set(shortcut.unique().tolist()) == {0.0, 1.0}


def test_the_student_sinusoid_uses_every_other_teacher_frequency():
    """With half the embedding width, the student's time MLP sees the teacher's even frequencies (scaled by 2)."""
    from diffusers.models.embeddings import get_timestep_embedding

    model = teacher()
    student = prune_unet(model, (4, 8, 16, 32))
    t = torch.tensor([0, 5, 400, 999])
    teacher_embedding = get_timestep_embedding(t, 8, flip_sin_to_cos=True, downscale_freq_shift=0)
    student_embedding = get_timestep_embedding(t, 4, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(student_embedding, teacher_embedding[:, [0, 2, 4, 6]])
    torch.testing.assert_close(student.time_embedding.linear_1.weight, 2 * model.time_embedding.linear_1.weight[:, [0, 2, 4, 6]])


@pytest.mark.parametrize("widths, match", [
    ((8, 16, 32, 16), "the last"),
    ((16, 16, 32, 32), "between 1 and the teacher's"),
    ((8, 16, 32), "needs 4 widths"),
    ((8, 8, 32, 32), "learned shortcut"),  # the teacher's 8 -> 16 projection would become an identity
    ((4, 16, 16, 32), "learned shortcut"),
])
def test_impossible_widths_are_refused(widths, match):
    with pytest.raises(ValueError, match=match):
        prune_unet(teacher(), widths)


def test_unsupported_blocks_and_group_counts_are_refused():
    attention = teacher(widths=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        prune_unet(attention, (4, 16))
    with pytest.raises(ValueError, match="time shift"):
        prune_unet(teacher(resnet_time_scale_shift="scale_shift"), (4, 8, 16, 32))
    with pytest.raises(ValueError, match="freq_shift"):
        prune_unet(teacher(freq_shift=1), (4, 8, 16, 32))
    assert prune_unet(teacher(freq_shift=1), (8, 16, 32, 32)).config.freq_shift == 1  # first width kept: fine
    with pytest.raises(ValueError, match="norm_num_groups 3"):
        prune_unet(teacher(), (4, 8, 16, 32), norm_num_groups=3)
    assert default_norm_groups(32, (16, 32, 64, 128)) == 16 and default_norm_groups(32, (32, 64, 128, 128)) == 32


def test_unclear_widths_and_groups_are_refused():
    unet = teacher()
    for widths, match in (((8.5, 16, 32, 32), "integers"), ((1, 16, 32, 32), "at least 2")):
        with pytest.raises(ValueError, match=match):
            prune_unet(unet, widths)
    with pytest.raises(ValueError, match="norm_num_groups must be an integer"):
        prune_unet(unet, (8, 16, 32, 32), norm_num_groups=0)
    with pytest.raises(ValueError, match="class embedding"):
        prune_unet(teacher(num_class_embeds=3), (8, 16, 32, 32))
