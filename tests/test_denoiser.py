"""Denoiser networks (model_zoo/unet.py) and size presets (model_zoo/presets.py), on CPU at tiny sizes."""

from __future__ import annotations

import copy

import pytest
import torch

from model_zoo.presets import PRESETS, ModelPreset, count_parameters, get_preset
from model_zoo.unet import (
    MLPDenoiser,
    TriplaneDenoiser,
    UNet,
    UNetConfig,
    VoxelDenoiser,
    build_denoiser,
)


def tiny_config(**overrides) -> UNetConfig:
    fields = {"base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1, "attention_head_channels": 8}
    return UNetConfig(**{**fields, **overrides})


def timesteps(batch: int) -> torch.Tensor:
    return torch.linspace(0, 999, batch).long()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("attention", [(), (1,)], ids=["no-attn", "attn"])
@pytest.mark.parametrize("use_checkpoint", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("dims,spatial", [(2, (8, 12)), (3, (4, 8, 4))])
def test_unet_output_shape(dims, spatial, attention, use_checkpoint):
    net = UNet(dims, 5, 3, tiny_config(attention_resolutions=attention, use_checkpoint=use_checkpoint))
    x = torch.randn(2, 5, *spatial, requires_grad=True)
    out = net(x, timesteps(2))
    assert out.shape == (2, 3, *spatial)
    out.mean().backward()  # checkpointed blocks must run a backward too
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(
    "kind,shape,cls",
    [
        ("triplane", (3, 4, 8, 8), TriplaneDenoiser),
        ("voxel", (4, 8, 8, 8), VoxelDenoiser),
        ("mlp", (37,), MLPDenoiser),
    ],
)
@pytest.mark.parametrize("attention", [(), (1,)], ids=["no-attn", "attn"])
def test_build_denoiser_keeps_representation_shape(kind, shape, cls, attention):
    net = build_denoiser(kind, shape, tiny_config(attention_resolutions=attention))
    assert isinstance(net, cls)
    x = torch.randn(3, *shape)
    assert net(x, timesteps(3)).shape == x.shape


@pytest.mark.parametrize("resolution", [7, 15, 18])
def test_triplane_padding_for_resolutions_not_divisible_by_downsampling(resolution):
    config = tiny_config(channel_mults=(1, 2, 2), attention_resolutions=(2,))  # factor 4
    net = build_denoiser("triplane", (3, 4, resolution, resolution), config)
    x = torch.randn(2, 3, 4, resolution, resolution, requires_grad=True)
    out = net(x, timesteps(2))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0


def test_voxel_padding_for_resolutions_not_divisible_by_downsampling():
    net = build_denoiser("voxel", (4, 5, 5, 5), tiny_config(channel_mults=(1, 2, 2)))
    x = torch.randn(1, 4, 5, 5, 5)
    assert net(x, torch.tensor([3])).shape == x.shape


def test_triplane_roll_out_keeps_each_plane_in_place():
    """Undoing the roll-out must return every plane to its own slot: with an identity U-Net the denoiser is the identity."""
    net = build_denoiser("triplane", (3, 2, 6, 6), tiny_config())
    net.unet.forward = lambda x, t, cond=None: x  # type: ignore[method-assign]
    x = torch.randn(2, 3, 2, 6, 6)
    assert torch.equal(net(x, timesteps(2)), x)


def test_unet_rejects_sizes_it_cannot_downsample():
    net = UNet(2, 3, 3, tiny_config(channel_mults=(1, 2, 2)))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 8, 6), timesteps(1))


def test_build_denoiser_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(3, C, R, R\)"):
        build_denoiser("triplane", (4, 4, 8, 8), tiny_config())
    with pytest.raises(ValueError, match="unknown denoiser kind"):
        build_denoiser("hashgrid", (10,), tiny_config())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- config


def test_config_validation():
    with pytest.raises(ValueError, match="num_groups"):
        UNetConfig(base_channels=12, num_groups=8)
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig(channel_mults=(1, 2), attention_resolutions=(2,))
    # YAML/JSON gives lists; the frozen config turns them into hashable tuples.
    config = UNetConfig(channel_mults=[1, 2], attention_resolutions=[1])  # type: ignore[arg-type]
    assert config.channel_mults == (1, 2) and config.attention_resolutions == (1,)
    assert hash(config) == hash(UNetConfig(channel_mults=(1, 2), attention_resolutions=(1,)))
    assert config.embed_dim == 4 * config.base_channels and config.downsample_factor == 2


# --------------------------------------------------------------------------- conditioning and gradients


@pytest.mark.parametrize("kind,shape", [("triplane", (3, 4, 8, 8)), ("voxel", (4, 4, 4, 4)), ("mlp", (21,))])
def test_timestep_changes_the_output(kind, shape):
    net = build_denoiser(kind, shape, tiny_config(dropout=0.1)).eval()
    x = torch.randn(1, *shape)
    with torch.no_grad():
        early, late = net(x, torch.tensor([10])), net(x, torch.tensor([900]))
        float_t = net(x, torch.tensor([10.0]))
    assert (early - late).abs().max() > 1e-4
    torch.testing.assert_close(early, float_t)  # int and float timesteps mean the same


def test_extra_condition_changes_the_output():
    net = build_denoiser("triplane", (3, 4, 8, 8), tiny_config(cond_dim=6)).eval()
    x, t = torch.randn(2, 3, 4, 8, 8), timesteps(2)
    with torch.no_grad():
        a, b = net(x, t, torch.randn(2, 6)), net(x, t, torch.randn(2, 6))
    assert (a - b).abs().max() > 1e-4
    unconditioned = build_denoiser("triplane", (3, 4, 8, 8), tiny_config())
    with pytest.raises(ValueError, match="cond_dim=0"):
        unconditioned(x, t, torch.randn(2, 6))


@pytest.mark.parametrize(
    "kind,shape", [("triplane", (3, 4, 8, 8)), ("voxel", (4, 4, 4, 4)), ("mlp", (21,))], ids=["triplane", "voxel", "mlp"]
)
def test_gradients_reach_every_parameter(kind, shape):
    net = build_denoiser(kind, shape, tiny_config(attention_resolutions=(0, 1), cond_dim=3))
    out = net(torch.randn(2, *shape), timesteps(2), torch.randn(2, 3))
    out.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached: {missing}"


def test_checkpointing_gives_the_same_gradients():
    plain = build_denoiser("triplane", (3, 4, 8, 8), tiny_config(attention_resolutions=(1,)))
    ckpt = build_denoiser("triplane", (3, 4, 8, 8), tiny_config(attention_resolutions=(1,), use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 4, 8, 8), timesteps(2)
    for net in (plain, ckpt):
        net(x, t).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# --------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("kind,shape", [("triplane", (3, 4, 8, 8)), ("voxel", (4, 4, 4, 4)), ("mlp", (21,))])
def test_bf16_weights_forward(kind, shape):
    net = build_denoiser(kind, shape, tiny_config(attention_resolutions=(1,))).to(torch.bfloat16)
    out = net(torch.randn(2, *shape, dtype=torch.bfloat16), timesteps(2))
    assert out.dtype == torch.bfloat16 and out.shape == (2, *shape) and torch.isfinite(out).all()


def test_bf16_autocast_forward_and_backward():
    net = build_denoiser("triplane", (3, 4, 8, 8), tiny_config(attention_resolutions=(1,)))
    reference = copy.deepcopy(net)
    x, t = torch.randn(2, 3, 4, 8, 8), timesteps(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    with torch.no_grad():
        full = reference(x, t)
    # bf16 keeps ~3 significant digits; the autocast result must still track the fp32 one.
    assert (out.float() - full).abs().mean() < 0.05 * full.abs().mean()


# --------------------------------------------------------------------------- presets


def _build(preset: ModelPreset, kind: str) -> torch.nn.Module:
    shape = {"triplane": preset.triplane_shape(), "voxel": preset.voxel_shape(), "mlp": (4096,)}[kind]
    return build_denoiser(kind, shape, preset.denoiser_config(kind))  # type: ignore[arg-type]


def test_tiny_preset_is_under_a_million_parameters_and_runs():
    preset = get_preset("tiny")
    net = _build(preset, "triplane")
    assert count_parameters(net) < 1_000_000
    x = torch.randn(2, *preset.triplane_shape())
    assert net(x, timesteps(2)).shape == x.shape


def test_large_preset_size_on_meta_device():
    preset = get_preset("large")
    with torch.device("meta"):
        triplane, voxel = _build(preset, "triplane"), _build(preset, "voxel")
    assert 100_000_000 <= count_parameters(triplane) <= 1_000_000_000
    assert 100_000_000 <= count_parameters(voxel) <= 1_000_000_000
    assert all(p.is_meta for p in triplane.parameters())


def test_presets_grow_in_size():
    with torch.device("meta"):
        sizes = [count_parameters(_build(PRESETS[name], "triplane")) for name in ("tiny", "small", "base", "large")]
    assert sizes == sorted(sizes)


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError) as info:
        get_preset("huge")
    message = str(info.value)
    assert "'huge'" in message
    for name in ("tiny", "small", "base", "large"):
        assert name in message


def test_count_parameters_trainable_only():
    net = torch.nn.Linear(3, 2)
    net.bias.requires_grad_(False)
    assert count_parameters(net) == 8 and count_parameters(net, trainable_only=True) == 6
