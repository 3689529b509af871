"""Tests for scripts/convert_guided_diffusion_to_diffusers.py.

The guided-diffusion package and its checkpoints are not available offline, so this file builds
*synthetic* guided-diffusion ``UNetModel`` state dicts (real key names and shapes, random non-zero
values) and a compact functional re-implementation of guided-diffusion's forward pass
(``reference_forward``) that reads those state dicts directly. The converted ``UNet2DModel`` must
reproduce that forward pass numerically.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_guided_diffusion_to_diffusers.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_guided_diffusion_to_diffusers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


conv = _load_script()


# ----------------------------------------------------------------------------------------------
# Synthetic guided-diffusion architecture: key shapes + a layer program, following
# guided_diffusion/unet.py::UNetModel.__init__ (written independently of the converter's plan).
# ----------------------------------------------------------------------------------------------
def gd_architecture(cfg: dict):
    """Return ``(shapes, program)`` for a guided-diffusion UNet of config ``cfg``.

    ``shapes``: ordered ``{key: shape}`` as in ``UNetModel.state_dict()``.
    ``program``: ``dict(input=[[layer, ...], ...], middle=[...], output=[[...], ...])`` with layers
    ``("conv", prefix)``, ``("res", prefix, up, down)``, ``("attn", prefix, heads)``,
    ``("down_conv", prefix)``, ``("up_conv", prefix)``.
    """
    mc, nrb, mult = cfg["model_channels"], cfg["num_res_blocks"], cfg["channel_mult"]
    ted = 4 * mc
    scale_shift = cfg["use_scale_shift_norm"]
    shapes: dict[str, tuple] = {}

    def linear(name, i, o):
        shapes[f"{name}.weight"] = (o, i)
        shapes[f"{name}.bias"] = (o,)

    def conv2d(name, i, o, k):
        shapes[f"{name}.weight"] = (o, i, k, k)
        shapes[f"{name}.bias"] = (o,)

    def conv1d(name, i, o):
        shapes[f"{name}.weight"] = (o, i, 1)
        shapes[f"{name}.bias"] = (o,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def res(prefix, ch, out, up=False, down=False):
        norm(f"{prefix}.in_layers.0", ch)
        conv2d(f"{prefix}.in_layers.2", ch, out, 3)
        linear(f"{prefix}.emb_layers.1", ted, 2 * out if scale_shift else out)
        norm(f"{prefix}.out_layers.0", out)
        conv2d(f"{prefix}.out_layers.3", out, out, 3)
        if out != ch:
            conv2d(f"{prefix}.skip_connection", ch, out, 1)
        return ("res", prefix, up, down)

    def attn(prefix, ch):
        heads = cfg["num_heads"] if cfg["num_head_channels"] == -1 else ch // cfg["num_head_channels"]
        norm(f"{prefix}.norm", ch)
        conv1d(f"{prefix}.qkv", ch, 3 * ch)
        conv1d(f"{prefix}.proj_out", ch, ch)
        return ("attn", prefix, heads)

    linear("time_embed.0", mc, ted)
    linear("time_embed.2", ted, ted)
    if cfg["num_classes"] is not None:
        shapes["label_emb.weight"] = (cfg["num_classes"], ted)

    ch = input_ch = int(mult[0] * mc)
    conv2d("input_blocks.0.0", cfg["in_channels"], ch, 3)
    inputs = [[("conv", "input_blocks.0.0")]]
    chans, ds = [ch], 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            idx = len(inputs)
            layers = [res(f"input_blocks.{idx}.0", ch, int(m * mc))]
            ch = int(m * mc)
            if ds in cfg["attention_ds"]:
                layers.append(attn(f"input_blocks.{idx}.1", ch))
            inputs.append(layers)
            chans.append(ch)
        if level != len(mult) - 1:
            idx = len(inputs)
            if cfg["resblock_updown"]:
                layers = [res(f"input_blocks.{idx}.0", ch, ch, down=True)]
            else:
                conv2d(f"input_blocks.{idx}.0.op", ch, ch, 3)
                layers = [("down_conv", f"input_blocks.{idx}.0.op")]
            inputs.append(layers)
            chans.append(ch)
            ds *= 2

    middle = [res("middle_block.0", ch, ch), attn("middle_block.1", ch), res("middle_block.2", ch, ch)]

    outputs = []
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            idx = len(outputs)
            ich = chans.pop()
            layers = [res(f"output_blocks.{idx}.0", ch + ich, int(mc * m))]
            ch = int(mc * m)
            if ds in cfg["attention_ds"]:
                layers.append(attn(f"output_blocks.{idx}.{len(layers)}", ch))
            if level and i == nrb:
                prefix = f"output_blocks.{idx}.{len(layers)}"
                if cfg["resblock_updown"]:
                    layers.append(res(prefix, ch, ch, up=True))
                else:
                    conv2d(f"{prefix}.conv", ch, ch, 3)
                    layers.append(("up_conv", f"{prefix}.conv"))
                ds //= 2
            outputs.append(layers)

    norm("out.0", input_ch)
    conv2d("out.2", input_ch, cfg["out_channels"], 3)
    return shapes, dict(input=inputs, middle=middle, output=outputs)


def random_state_dict(shapes: dict, seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Random non-zero values (zero-initialised layers of guided-diffusion included)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g, dtype=dtype)
        elif len(shape) == 1:  # GroupNorm weight
            t = 1.0 + 0.2 * torch.randn(shape, generator=g, dtype=dtype)
        elif key == "label_emb.weight":
            t = torch.randn(shape, generator=g, dtype=dtype)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g, dtype=dtype) / math.sqrt(fan_in)
        sd[key] = t
    return sd


# ----------------------------------------------------------------------------------------------
# Reference forward: guided-diffusion UNetModel.forward with torch.nn.functional only.
# ----------------------------------------------------------------------------------------------
def gd_timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    # guided-diffusion computes this in float32 (then casts to the model dtype), as diffusers does.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def reference_forward(sd, program, cfg, x, t, y=None):
    dtype = x.dtype

    def gn(h, p):
        return F.group_norm(h, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def conv3(h, p, stride=1):
        return F.conv2d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], stride=stride, padding=1)

    def resblock(h, emb, p, up, down):
        x_in = h
        h = F.silu(gn(h, f"{p}.in_layers.0"))
        if up:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            x_in = F.interpolate(x_in, scale_factor=2, mode="nearest")
        elif down:
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
            x_in = F.avg_pool2d(x_in, kernel_size=2, stride=2)
        h = conv3(h, f"{p}.in_layers.2")
        e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[..., None, None]
        if cfg["use_scale_shift_norm"]:
            scale, shift = e.chunk(2, dim=1)
            h = gn(h, f"{p}.out_layers.0") * (1 + scale) + shift
            h = F.silu(h)
        else:
            h = F.silu(gn(h + e, f"{p}.out_layers.0"))
        h = conv3(h, f"{p}.out_layers.3")  # (dropout is the identity in eval)
        if f"{p}.skip_connection.weight" in sd:
            x_in = F.conv2d(x_in, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
        return x_in + h

    def attention(h, p, heads):
        b, c, hh, ww = h.shape
        h = h.reshape(b, c, -1)
        qkv = F.conv1d(gn(h, f"{p}.norm"), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
        length, ch = qkv.shape[-1], c // heads
        if cfg["use_new_attention_order"]:  # QKVAttention
            q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
        else:  # QKVAttentionLegacy
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)
        out = F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
        return (h + out).reshape(b, c, hh, ww)

    def run(layers, h, emb):
        for layer in layers:
            kind, p = layer[0], layer[1]
            if kind == "conv":
                h = conv3(h, p)
            elif kind == "res":
                h = resblock(h, emb, p, layer[2], layer[3])
            elif kind == "attn":
                h = attention(h, p, layer[2])
            elif kind == "down_conv":
                h = conv3(h, p, stride=2)
            elif kind == "up_conv":
                h = conv3(F.interpolate(h, scale_factor=2, mode="nearest"), p)
        return h

    temb = gd_timestep_embedding(t, cfg["model_channels"]).to(dtype)
    emb = F.linear(temb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:
        emb = emb + F.embedding(y, sd["label_emb.weight"])
    hs, h = [], x
    for layers in program["input"]:
        h = run(layers, h, emb)
        hs.append(h)
    h = run(program["middle"], h, emb)
    for layers in program["output"]:
        h = run(layers, torch.cat([h, hs.pop()], dim=1), emb)
    h = F.silu(gn(h, "out.0"))
    return conv3(h, "out.2")


# ----------------------------------------------------------------------------------------------
SMALL_RGB = dict(  # 2 heads of 32 channels at the 16x16 level and in the middle: tests the legacy qkv order
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="16",
    num_head_channels=32, learn_sigma=True, in_channels=3, resblock_updown=True,
)
SMALL_GRAY = dict(  # BlindDPS-kernel-like: 1 -> 2 channels, one head per attention layer, 2 res blocks
    image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,2,2", attention_resolutions="16,8",
    num_heads=1, num_head_channels=-1, learn_sigma=True, in_channels=1, resblock_updown=True,
)
SMALL_VARIANTS = dict(  # new attention order, conv up/down, additive time embedding, class-conditional
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="8",
    num_heads=2, num_head_channels=-1, learn_sigma=False, in_channels=3, use_scale_shift_norm=False,
    resblock_updown=False, use_new_attention_order=True, num_classes=5,
)


def _check_equivalence(overrides, seed, dtype=torch.float64, atol=1e-8, batch=2):
    cfg = conv.guided_diffusion_config(**overrides)
    shapes, program = gd_architecture(cfg)
    sd = random_state_dict(shapes, seed=seed, dtype=dtype)
    unet = conv.build_unet(sd, cfg, dtype=dtype)  # strict load, shapes checked
    assert sum(p.numel() for p in unet.parameters()) == sum(math.prod(s) for s in shapes.values())

    g = torch.Generator().manual_seed(seed + 1)
    size = cfg["image_size"]
    x = torch.randn(batch, cfg["in_channels"], size, size, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg["num_classes"], (batch,), generator=g) if cfg["num_classes"] else None
    with torch.no_grad():
        ref = reference_forward(sd, program, cfg, x, t, y)
        out = unet(x, t, class_labels=y).sample
    assert out.shape == (batch, cfg["out_channels"], size, size)
    assert ref.abs().mean() > 0.05  # the check is not vacuous
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    return cfg, unet


@pytest.mark.parametrize(
    "overrides", [SMALL_RGB, SMALL_GRAY, SMALL_VARIANTS], ids=["rgb_learn_sigma", "gray_1to2", "variants"]
)
def test_converted_unet_matches_guided_diffusion_forward(overrides):
    cfg, unet = _check_equivalence(overrides, seed=0)
    assert unet.config.out_channels == (2 if cfg["learn_sigma"] else 1) * cfg["in_channels"]


def test_blinddps_kernel_preset_full_size_float32():
    """The real BlindDPS kernel-prior architecture (17 M parameters, 3 heads at 16x16, 4 in the middle)."""
    cfg, unet = _check_equivalence(conv.PRESETS["blinddps_kernel"], seed=7, dtype=torch.float32, atol=1e-4, batch=1)
    assert (unet.config.in_channels, unet.config.out_channels) == (1, 2)


def test_unet_config_choices():
    cfg = conv.guided_diffusion_config(**SMALL_RGB)
    unet_cfg = conv.unet_config_from_guided(cfg)
    assert cfg["attention_ds"] == (2,)
    assert unet_cfg["down_block_types"] == ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
    assert unet_cfg["up_block_types"] == ("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
    assert unet_cfg["flip_sin_to_cos"] is True and unet_cfg["freq_shift"] == 0
    assert unet_cfg["resnet_time_scale_shift"] == "scale_shift"
    assert unet_cfg["attn_norm_num_groups"] == 32 and unet_cfg["attention_head_dim"] == 32


def test_unrepresentable_configs_raise():
    # guided-diffusion's defaults: 4 heads of 96 (16x16, 384 ch) and of 128 (8x8, 512 ch) channels.
    with pytest.raises(ValueError, match="attention_head_dim"):
        conv.unet_config_from_guided(conv.guided_diffusion_config())
    # ... fine with a fixed head width
    assert conv.unet_config_from_guided(conv.guided_diffusion_config(num_head_channels=64))["attention_head_dim"] == 64
    # The 512x512 model's channel_mult starts at 0.5.
    with pytest.raises(ValueError, match="channel_mult"):
        conv.unet_config_from_guided(conv.guided_diffusion_config(image_size=512, num_head_channels=64))


def test_timestep_embedding_convention():
    from diffusers.models.embeddings import Timesteps

    t = torch.tensor([0, 1, 17, 500, 999])
    ours = Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    torch.testing.assert_close(ours, gd_timestep_embedding(t, 128), atol=1e-6, rtol=0)


# guided-diffusion UNetModel with the DPS `ffhq_10m.pt` configuration (sum of the state-dict shapes).
FFHQ_10M_PARAMS = 93_563_910


def _meta_state_dict(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("preset", ["ffhq_dps", "blinddps_kernel", "blinddps_tilt"])
def test_presets_full_size_on_meta_device(preset):
    """Every full-size preset converts key-for-key and shape-for-shape (no memory allocated)."""
    cfg = conv.guided_diffusion_config(**conv.PRESETS[preset])
    shapes, _ = gd_architecture(cfg)
    unet = conv.build_unet(_meta_state_dict(shapes), cfg, dtype=None)
    n_model = sum(p.numel() for p in unet.parameters())
    n_guided = sum(math.prod(s) for s in shapes.values())
    assert n_model == n_guided
    if preset == "ffhq_dps":
        assert unet.config.out_channels == 6 and unet.config.sample_size == 256
        assert unet.config.block_out_channels == (128, 128, 256, 256, 512, 512)
        assert unet.config.down_block_types[4] == "AttnDownBlock2D"  # the 16x16 level
        assert sum("Attn" in b for b in unet.config.down_block_types) == 1
        assert n_model == FFHQ_10M_PARAMS
    elif preset == "blinddps_kernel":
        assert (unet.config.in_channels, unet.config.out_channels) == (1, 2)
        assert unet.config.block_out_channels == (64, 128, 192, 256)
        assert unet.config.down_block_types[2] == "AttnDownBlock2D"  # 64 / 4 = 16x16
    else:
        assert (unet.config.in_channels, unet.config.out_channels) == (2, 4)


def test_legacy_qkv_split_is_per_head():
    heads, ch, c = 3, 2, 6
    w = torch.arange(3 * c * c, dtype=torch.float32).reshape(3 * c, c)
    q, k, v = conv._split_qkv(w, heads, new_order=False)
    for h in range(heads):
        torch.testing.assert_close(q[h * ch:(h + 1) * ch], w[h * 3 * ch: h * 3 * ch + ch])
        torch.testing.assert_close(k[h * ch:(h + 1) * ch], w[h * 3 * ch + ch: h * 3 * ch + 2 * ch])
        torch.testing.assert_close(v[h * ch:(h + 1) * ch], w[h * 3 * ch + 2 * ch: (h + 1) * 3 * ch])
    q2, k2, v2 = conv._split_qkv(w, heads, new_order=True)
    torch.testing.assert_close(torch.cat([q2, k2, v2]), w)


def test_missing_and_unexpected_keys_are_listed():
    cfg = conv.guided_diffusion_config(**SMALL_RGB)
    shapes, _ = gd_architecture(cfg)
    sd = _meta_state_dict(shapes)
    del sd["input_blocks.3.1.qkv.weight"]
    sd["input_blocks.9.0.op.weight"] = torch.empty(1, device="meta")
    with pytest.raises(conv.ConversionError) as err:
        conv.convert_state_dict(sd, cfg)
    msg = str(err.value)
    assert "input_blocks.3.1.qkv.weight" in msg and "input_blocks.9.0.op.weight" in msg
    assert "missing keys (1)" in msg and "unexpected keys (1)" in msg

    # A checkpoint trained without resblock_updown (BlindDPS issue #3) is reported, not mis-loaded.
    wrong = conv.guided_diffusion_config(**{**SMALL_RGB, "resblock_updown": False})
    with pytest.raises(conv.ConversionError, match="op.weight"):
        conv.convert_state_dict(_meta_state_dict(shapes), wrong)


def test_module_prefix_is_stripped():
    cfg = conv.guided_diffusion_config(**SMALL_RGB)
    shapes, _ = gd_architecture(cfg)
    sd = {f"module.{k}": v for k, v in _meta_state_dict(shapes).items()}
    assert set(conv.convert_state_dict(sd, cfg)) == set(conv.convert_state_dict(_meta_state_dict(shapes), cfg))


def test_cli_end_to_end(tmp_path):
    overrides = dict(SMALL_GRAY)
    cfg = conv.guided_diffusion_config(**overrides)
    shapes, program = gd_architecture(cfg)
    sd = random_state_dict(shapes, seed=5, dtype=torch.float32)
    ckpt = tmp_path / "kernel_model.pt"
    torch.save(sd, ckpt)
    out_dir = tmp_path / "converted"
    cmd = [
        sys.executable, str(SCRIPT), "--checkpoint", str(ckpt), "--config", "blinddps_kernel",
        "--output_dir", str(out_dir), "--image_size", "32", "--num_channels", "32", "--num_res_blocks", "2",
        "--channel_mult", "1,2,2", "--attention_resolutions", "16,8", "--num_heads", "1",
        "--num_head_channels", "-1", "--learn_sigma", "True", "--in_channels", "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out_dir / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"

    unet = UNet2DModel.from_pretrained(out_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(out_dir, subfolder="scheduler")
    assert scheduler.config.variance_type == "learned_range"
    assert scheduler.config.timestep_spacing == "linspace" and scheduler.config.clip_sample
    assert scheduler.config.beta_schedule == "linear" and scheduler.config.num_train_timesteps == 1000
    assert (unet.config.in_channels, unet.config.out_channels) == (1, 2)

    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([321])
    with torch.no_grad():
        ref = reference_forward(sd, program, cfg, x, t)
        torch.testing.assert_close(unet(x, t).sample, ref, atol=1e-4, rtol=0)

    # Wrong architecture (in-process, to save an interpreter start): the key report is raised.
    with pytest.raises(conv.ConversionError, match="unexpected keys"):
        conv.main(cmd[2:] + ["--num_res_blocks", "1", "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_scheduler_config():
    cfg = conv.guided_diffusion_config(**conv.PRESETS["ffhq_dps"])
    s = DDPMScheduler(**conv.scheduler_config_from_guided(cfg))
    assert s.config.variance_type == "learned_range"
    fixed = conv.guided_diffusion_config(**{**SMALL_RGB, "learn_sigma": False})
    s2 = DDPMScheduler(**conv.scheduler_config_from_guided(fixed))
    assert s2.config.variance_type == "fixed_small"
    # guided-diffusion's linear schedule: linspace(1e-4, 0.02, 1000)
    expected = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(s.betas.double(), expected, atol=1e-8, rtol=0)
    s.set_timesteps(100)
    assert s.timesteps[0] == 999 and s.timesteps[-1] == 0 and s.timesteps[1] == 989


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint not found"),
    (b"", "empty or truncated"),
    (bytes(range(256)) * 2, "not plain tensors, or not a PyTorch file"),
])
def test_unreadable_checkpoints_are_named(tmp_path, content, message):
    ckpt = tmp_path / "model.pt"
    if content is not None:
        ckpt.write_bytes(content)
    with pytest.raises(conv.ConversionError, match=message) as error:
        conv.main(["--checkpoint", str(ckpt), "--config", "blinddps_kernel", "--output_dir", str(tmp_path / "out")])
    assert "weights_only=False" not in str(error.value)  # never advise loading pickled code
    assert not (tmp_path / "out").exists()


def test_output_folder_safety_and_ema_first(tmp_path, capsys):
    """A file or a non-empty folder as --output_dir is refused before anything is read or written (unless
    --overwrite); a checkpoint holding both a model and an EMA copy converts the EMA weights."""
    overrides = dict(SMALL_GRAY)
    cfg = conv.guided_diffusion_config(**overrides)
    shapes, _ = gd_architecture(cfg)
    model, ema = random_state_dict(shapes, seed=1, dtype=torch.float32), random_state_dict(shapes, seed=2, dtype=torch.float32)
    ckpt = tmp_path / "both.pt"
    torch.save({"model": model, "ema": ema}, ckpt)
    argv = ["--checkpoint", str(ckpt), "--config", "blinddps_kernel", "--image_size", "32", "--num_channels", "32",
            "--num_res_blocks", "2", "--channel_mult", "1,2,2", "--attention_resolutions", "16,8", "--num_heads", "1",
            "--num_head_channels", "-1", "--learn_sigma", "True", "--in_channels", "1"]
    with pytest.raises(conv.ConversionError, match="is a file"):
        conv.main([*argv, "--output_dir", str(ckpt)])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(conv.ConversionError, match="not empty"):
        conv.main([*argv, "--output_dir", str(mine)])
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert conv.main([*argv, "--output_dir", str(mine), "--overwrite"]) == 0
    assert "converting 'ema'" in capsys.readouterr().out and (mine / "notes.txt").read_text() == "keep"
    unet = UNet2DModel.from_pretrained(mine, subfolder="unet")
    reference = conv.build_unet(ema, cfg)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(unet.state_dict()[name], tensor)
