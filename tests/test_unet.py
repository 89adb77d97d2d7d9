"""CDM U-Net: checkpoint-manifest parity, Fig. 6a layer indexing, forward contract, checkpointing."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from diffmi_ray.models import create, get_info, names
from diffmi_ray.models.unet import (
    OFFICIAL_FINETUNE_LAYERS, AttentionBlock, UNetModel, finetune_parameter_names, middle_block_layers,
    timestep_embedding,
)

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "manifests" / "diffmi_unet_64.json"
# sha256 of "name:(shape...)" lines of the manifest's ordered state_dict, so parity is checked even
# where the shared manifest folder is absent.
MANIFEST_SHA256 = "3ddc7f5716c4b9a427e7b2e514059b26330c854ccba03eb0e6a13ac6400cd8bc"
OFFICIAL_FINETUNE_TENSORS = [
    "label_emb.weight",
    "middle_block.0.in_layers.2.weight", "middle_block.0.in_layers.2.bias",
    "middle_block.0.out_layers.3.weight", "middle_block.0.out_layers.3.bias",
    "middle_block.1.proj_out.weight", "middle_block.1.proj_out.bias",
    "middle_block.2.in_layers.2.weight", "middle_block.2.in_layers.2.bias",
    "middle_block.2.out_layers.3.weight", "middle_block.2.out_layers.3.bias",
]


def _manifest() -> dict:
    if not MANIFEST.exists():
        pytest.skip(f"manifest not found at {MANIFEST}")
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def paper_unet() -> UNetModel:
    with torch.device("meta"):  # 121.6M params: shapes only, no memory, no init cost
        return create("diffmi_unet_64", num_classes=1000)


def _small(**kw) -> UNetModel:
    torch.manual_seed(0)
    cfg = dict(image_size=32, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(16,), num_heads=2)
    cfg.update(kw)
    m = create("cdm_unet", num_classes=5, **cfg)
    with torch.no_grad():  # zero-initialised branches would make most gradients trivially zero
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


# ----------------------------------------------------------------------------------------- manifest

def test_paper_unet_state_dict_matches_manifest(paper_unet):
    man = _manifest()
    ours = [(k, list(v.shape)) for k, v in paper_unet.state_dict().items()]
    ref = [(k, list(shape)) for k, shape, _ in man["state_dict"]]
    assert len(ours) == man["num_state_dict_keys"] == 451
    assert ours == ref  # names, shapes and order
    assert sum(p.numel() for p in paper_unet.parameters()) == man["num_parameters"] == 121_572_995
    assert not list(paper_unet.buffers())


def test_paper_unet_state_dict_pinned_hash(paper_unet):
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in paper_unet.state_dict().items())
    assert hashlib.sha256(lines.encode()).hexdigest() == MANIFEST_SHA256
    assert sum(p.numel() for p in paper_unet.parameters()) == 121_572_995
    assert finetune_parameter_names(paper_unet) == OFFICIAL_FINETUNE_TENSORS


def test_registry_entries():
    info = get_info("diffmi_unet_64")
    assert info.kind == "unet" and info.image_sizes == (64,)
    assert info.size_error(32, 3) is not None and info.size_error(64, 3) is None
    assert {"diffmi_unet_64", "cdm_unet"} <= set(names("unet"))


def test_middle_block_layers_fig6a(paper_unet):
    man = _manifest()
    layers = middle_block_layers(paper_unet)
    assert [i for i, _, _ in layers] == list(range(1, 14))
    # the 13 layers partition the middle block's parameters
    flat = [p for _, _, params in layers for p in params]
    assert sorted(flat) == sorted(k for k, _ in man["middle_block_parameters"])
    by_index = {i: name for i, name, _ in layers}
    assert by_index[2] == "middle_block.0.in_layers.2" and by_index[4] == "middle_block.0.out_layers.3"
    assert by_index[8] == "middle_block.1.proj_out"
    assert by_index[10] == "middle_block.2.in_layers.2" and by_index[12] == "middle_block.2.out_layers.3"
    # norms are 1, 3, 6, 9, 11 (Fig. 2); emb Linear 5, 13; qkv 7
    assert [i for i, n, _ in layers if n.endswith((".in_layers.0", ".out_layers.0", ".norm"))] == [1, 3, 6, 9, 11]
    assert [i for i, n, _ in layers if n.endswith(("emb_layers.1", "qkv"))] == [5, 7, 13]


def test_official_finetune_parameters(paper_unet):
    man = _manifest()["finetune_trained_parameters"]
    got = finetune_parameter_names(paper_unet, OFFICIAL_FINETUNE_LAYERS)
    assert got == [k for k, _ in man["tensors"]]
    shapes = dict(paper_unet.named_parameters())
    assert sum(shapes[k].numel() for k in got) == man["num_elements"] == 10_214_400
    assert finetune_parameter_names(paper_unet, [12, 2, 10, 8, 4]) == got  # order-independent
    assert finetune_parameter_names(paper_unet, [], include_label_emb=True) == ["label_emb.weight"]
    assert len(finetune_parameter_names(paper_unet, range(1, 14))) == 1 + 26
    with pytest.raises(ValueError):
        finetune_parameter_names(paper_unet, [0])


# ----------------------------------------------------------------------------------------- forward

def test_small_unet_forward_contract():
    m = _small(image_size=16, attention_resolutions=(8,)).eval()
    assert m.label_emb.weight.shape == (6, 128) and m.null_label == 5
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 5])
    with torch.no_grad():
        ref = m(x, torch.tensor([7, 7]), y)
        assert ref.shape == x.shape
        for t in (7, torch.tensor(7.0), torch.tensor([7.0])):
            assert torch.allclose(m(x, t, y), ref, atol=1e-6)
        assert torch.allclose(m(x, 7, None), m(x, 7, torch.tensor([5, 5])))
        assert not torch.allclose(m(x, 7, y), m(x, 500, y))  # t matters
        assert not torch.allclose(m(x, 7, torch.tensor([1, 5]))[0], ref[0])  # y matters
    with pytest.raises(ValueError):
        m(x, torch.tensor([1, 2, 3]), y)


def test_small_unet_attention_placement_in_pixels():
    m = _small(channel_mult=(1, 2, 2), attention_resolutions=(16, 8))
    attn = [n for n, mod in m.named_modules() if isinstance(mod, AttentionBlock)]
    # 32 px input: level 1 is 16 px, level 2 is 8 px; encoder 1 + 1, middle 1, decoder (8 px first) 2 + 2
    assert attn == ["input_blocks.3.1", "input_blocks.5.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1",
                    "output_blocks.2.1", "output_blocks.3.1"]
    with pytest.raises(ValueError, match="attention_resolutions"):
        _small(attention_resolutions=(12,))
    with pytest.raises(ValueError, match="divisible"):
        _small(image_size=30, channel_mult=(1, 2, 2))


def test_gradient_checkpointing_equal_grads():
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([3, 800]), torch.tensor([1, 4])
    results = []
    for ckpt in (False, True):
        m = _small(use_checkpoint=ckpt)
        xi = x.clone().requires_grad_(True)
        loss = (m(xi, t, y) ** 2).mean()
        loss.backward()
        results.append((loss.detach(), xi.grad, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, gx0, g0), (l1, gx1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-7) and torch.allclose(gx0, gx1, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n
    assert all(g.abs().sum() > 0 for n, g in g0.items() if n != "label_emb.weight")


def test_checkpointing_toggle_and_frozen_params():
    m = _small()
    m.set_gradient_checkpointing(True)
    assert all(b.use_checkpoint for b in m.modules() if hasattr(b, "use_checkpoint") and b is not m)
    # only the fine-tuned subset trainable: gradients still reach it through checkpointed blocks
    train = set(finetune_parameter_names(m))
    for n, p in m.named_parameters():
        p.requires_grad_(n in train)
    x = torch.randn(2, 1, 32, 32)
    m(x, 10, torch.tensor([0, 1])).square().mean().backward()
    assert all((p.grad is not None) == (n in train) for n, p in m.named_parameters())
    assert m.middle_block[0].in_layers[2].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- pieces

def test_attention_block_legacy_head_order():
    """qkv channels are split head-first: (B, heads, 3, d, T); scale 1/sqrt(d) overall."""
    torch.manual_seed(3)
    blk = AttentionBlock(64, num_heads=4, norm_groups=32)
    with torch.no_grad():
        blk.proj_out.weight.normal_(0, 0.1)
    x = torch.randn(2, 64, 4, 4)
    b, c, T, h = 2, 64, 16, 4
    d = c // h
    qkv = blk.qkv(blk.norm(x.reshape(b, c, T))).reshape(b, h, 3, d, T)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, h, d, T)
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bhts,bhcs->bhct", w, v).reshape(b, c, T)
    ref = (x.reshape(b, c, T) + blk.proj_out(a)).reshape(x.shape)
    assert torch.allclose(blk(x), ref, atol=1e-5)


def test_timestep_embedding_layout():
    e = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    assert torch.allclose(e[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    assert timestep_embedding(torch.tensor([1.0]), 7).shape == (1, 7)
