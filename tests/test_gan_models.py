"""GAN generators / discriminators: community-checkpoint key parity, shapes, ranges, conditioning."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffmi_ray.models import create, get_info, names
from diffmi_ray.models.gan_kedmi import MinibatchDiscrimination
from diffmi_ray.models.gan_plgmi import CategoricalConditionalBatchNorm2d

# (number of state_dict keys, number of parameters, sha256 of the ordered "name:shape:dtype" lines) of
# each shared manifest (manifests/<name>.json), so parity is checked even where the JSON files are absent.
MANIFEST_FINGERPRINTS = {
    "gmi_generator_64": (26, 5142083, "c6ee4d499f004b19597bb500bd4ae2c6dc24be79058288572b381d7371ecc0f6"),
    "gmi_discriminator_64": (16, 4316545, "9f5646f493cccd0d751f61c11dd28b8297fe6dd2ba78b1ec22ca52e712f5e021"),
    "kedmi_generator_64": (26, 5142083, "c6ee4d499f004b19597bb500bd4ae2c6dc24be79058288572b381d7371ecc0f6"),
    "kedmi_minibatch_discriminator_64": (19, 18888936,
                                         "0ea0a7dcee6ae6abff817a67e5c4a5054d7df35a532ffd7ebae049f1f02e1006"),
    "plgmi_generator_64": (73, 17973379, "2b16976f7742e480ac512db011994dfadc5029ad2eceb7978dd9669c0409ac04"),
    "plgmi_discriminator_64": (67, 11165441, "07efae14be44137dbe906ef5be9373e8f0159d017434e1cc5b372cb29eb9ea21"),
}


def _manifest_dir() -> Path | None:
    candidates = [os.environ.get("DIFFMI_MANIFEST_DIR"), Path(__file__).resolve().parents[2] / "shared" / "manifests"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def _rows(model: torch.nn.Module) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]


@functools.lru_cache(maxsize=None)
def _paper_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create(name, num_classes=1000).eval()


@pytest.mark.parametrize("name", sorted(MANIFEST_FINGERPRINTS))
def test_state_dict_matches_manifest(name):
    model = _paper_model(name)
    rows = _rows(model)
    n_keys, n_params, digest = MANIFEST_FINGERPRINTS[name]
    d = _manifest_dir()
    if d is not None and (d / f"{name}.json").exists():  # readable diff where the JSON is at hand
        m = json.loads((d / f"{name}.json").read_text())
        assert m["model"] == name
        assert rows == [(k, list(s), t) for k, s, t in m["state_dict"]]
    text = "\n".join(f"{k}:{'x'.join(map(str, s))}:{t}" for k, s, t in rows)
    assert len(rows) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert hashlib.sha256(text.encode()).hexdigest() == digest
    # a strict load of a 'module.'-prefixed checkpoint (as the community files are saved) once stripped
    ck = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k.removeprefix("module."): v for k, v in ck.items()}, strict=True)


def test_registry_metadata():
    gens = set(names("generator"))
    dis = set(names("discriminator"))
    assert {"gmi_generator_64", "kedmi_generator_64", "plgmi_generator_64", "dcgan_generator",
            "plgmi_generator"} <= gens
    assert {"gmi_discriminator_64", "kedmi_minibatch_discriminator_64", "plgmi_discriminator_64", "wgan_critic",
            "kedmi_discriminator", "plgmi_discriminator"} <= dis
    assert get_info("gmi_generator_64").size_error(32, 1) is not None
    assert get_info("dcgan_generator").size_error(32, 1) is None
    assert get_info("plgmi_discriminator").size_error(32, 3) is None
    assert get_info("plgmi_generator_64").extra["manifest"] == "plgmi_generator_64"


@torch.no_grad()
def test_paper_size_forward_shapes_and_ranges():
    torch.manual_seed(0)
    g = _paper_model("gmi_generator_64")
    assert (g.z_dim, g.out_range, g.conditional) == (100, "01", False)
    x = g(torch.randn(2, 100))
    assert x.shape == (2, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(g.to_unit(x), x)
    assert _paper_model("gmi_discriminator_64")(x).shape == (2,)
    feat, logits = _paper_model("kedmi_minibatch_discriminator_64")(x)
    assert feat.shape == (2, 4096) and logits.shape == (2, 1000)

    pg = _paper_model("plgmi_generator_64")
    assert (pg.z_dim, pg.out_range, pg.conditional) == (128, "pm1", True)
    y = torch.tensor([0, 999])
    xp = pg(torch.randn(2, 128), y)
    assert xp.shape == (2, 3, 64, 64) and -1 <= xp.min() and xp.max() <= 1
    u = pg.to_unit(xp)
    assert 0 <= u.min() and u.max() <= 1 and torch.allclose(u, (xp + 1) / 2)
    assert _paper_model("plgmi_discriminator_64")(xp, y).shape == (2, 1)


@pytest.mark.parametrize("image_size,channels", [(32, 1), (64, 3)])
def test_cpu_scale_variants(image_size, channels):
    torch.manual_seed(0)
    kw = dict(image_size=image_size, channels=channels, width=8)
    g = create("dcgan_generator", 10, z_dim=16, **kw)
    z = g.sample_latent(3, torch.Generator().manual_seed(1))
    assert z.shape == (3, 16)
    x = g(z)
    assert x.shape == (3, channels, image_size, image_size) and 0 <= x.min() and x.max() <= 1
    assert create("wgan_critic", 10, **kw)(x).shape == (3,)
    feat, logits = create("kedmi_discriminator", 10, mbd_features=4, mbd_kernel_dims=3, **kw)(x)
    assert feat.shape == (3, 8 * 4 * (image_size // 16) ** 2) and logits.shape == (3, 10)

    pg = create("plgmi_generator", 10, z_dim=12, **kw)
    y = torch.tensor([0, 5, 9])
    xp = pg(torch.randn(3, 12), y)
    assert xp.shape == (3, channels, image_size, image_size) and -1 <= xp.min() and xp.max() <= 1
    out = create("plgmi_discriminator", 10, **kw)(xp, y)
    assert out.shape == (3, 1)
    # gradients reach the latent, as the attacks need
    z = torch.randn(2, 12, requires_grad=True)
    pg(z, y[:2]).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@torch.no_grad()
def test_128px_variants_build_and_run():
    kw = dict(image_size=128, channels=1, width=2)
    x = create("dcgan_generator", 4, z_dim=4, **kw)(torch.randn(2, 4))
    assert x.shape == (2, 1, 128, 128)
    assert create("wgan_critic", 4, **kw)(x).shape == (2,)
    assert create("kedmi_discriminator", 4, mbd_features=2, mbd_kernel_dims=2, **kw)(x)[1].shape == (2, 4)
    xp = create("plgmi_generator", 4, z_dim=4, **kw)(torch.randn(2, 4), torch.tensor([0, 3]))
    assert xp.shape == (2, 1, 128, 128)
    assert create("plgmi_discriminator", 4, **kw)(xp, torch.tensor([0, 3])).shape == (2, 1)


def test_bad_sizes_rejected():
    with pytest.raises(ValueError):
        create("dcgan_generator", 10, image_size=48)
    with pytest.raises(ValueError):
        create("plgmi_discriminator", 10, image_size=30)
    with pytest.raises(ValueError):
        create("kedmi_discriminator", 10, image_size=16)


def test_categorical_conditional_bn_matches_reference():
    torch.manual_seed(0)
    bn = CategoricalConditionalBatchNorm2d(5, 4)
    with torch.no_grad():
        bn.weights.weight.normal_()
        bn.biases.weight.normal_()
    x, y = torch.randn(6, 4, 3, 3), torch.tensor([0, 1, 2, 3, 4, 0])
    ref = F.batch_norm(x, None, None, training=True)
    ref = bn.weights.weight[y][:, :, None, None] * ref + bn.biases.weight[y][:, :, None, None]
    assert torch.allclose(bn(x, y), ref, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_mean, torch.zeros(4))


@torch.no_grad()
def test_conditional_generator_uses_label():
    torch.manual_seed(0)
    g = create("plgmi_generator", 10, image_size=32, channels=1, width=8, z_dim=8).eval()
    z = torch.randn(1, 8).repeat(2, 1)
    same = g(z, torch.tensor([3, 3]))
    assert torch.allclose(same[0], same[1])
    for m in g.modules():  # per-class gamma/beta start equal (1, 0); make them class-specific
        if isinstance(m, CategoricalConditionalBatchNorm2d):
            m.weights.weight.normal_(1.0, 0.2)
            m.biases.weight.normal_(0.0, 0.2)
    out = g(z, torch.tensor([3, 7]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_minibatch_discrimination_matches_loop_and_depends_on_batch():
    torch.manual_seed(0)
    mbd = MinibatchDiscrimination(5, 3, 2)
    x = torch.randn(4, 5)
    out = mbd(x)
    m = (x @ mbd.T.view(5, -1)).view(4, 3, 2)
    ref = torch.zeros(4, 3)
    for i in range(4):
        for j in range(4):
            if i != j:
                ref[i] += torch.exp(-(m[i] - m[j]).abs().sum(-1))
    assert torch.allclose(out, torch.cat([x, ref], 1), atol=1e-6)

    d = create("kedmi_discriminator", 10, image_size=32, channels=1, width=4, mbd_features=4, mbd_kernel_dims=3)
    with torch.no_grad():
        d.mbd1.T.mul_(0.01)  # keep exp(-L1) away from underflow at random init
        imgs = torch.rand(3, 1, 32, 32)
        feat_a, logits_a = d(imgs)
        other = imgs.clone()
        other[1:] = torch.rand(2, 1, 32, 32)
        feat_b, logits_b = d(other)
    assert torch.allclose(feat_a[0], feat_b[0])  # features are per-sample
    assert not torch.allclose(logits_a[0], logits_b[0])  # logits see the batch


def test_plgmi_discriminator_spectral_norm():
    torch.manual_seed(0)
    d = create("plgmi_discriminator", 10, image_size=32, channels=1, width=4)
    sd = d.state_dict()
    wrapped = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_orig")}
    assert wrapped == {k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_u")}
    assert wrapped == {k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_v")}
    assert not any(k.endswith(".weight") for k in sd)
    assert {"l6", "l_y", "block1.c1", "block4.c_sc"} <= wrapped
    x, y = torch.rand(2, 1, 32, 32), torch.tensor([1, 2])
    d.train()
    conv = d.block2.c2
    for _ in range(30):  # one power iteration per training-mode forward of the layer
        conv(torch.zeros(1, conv.in_channels, 4, 4))
    w = conv.weight.detach().flatten(1)
    assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 1e-2
    d(x, y)
    # a strict load carries the u/v buffers, so eval outputs agree
    d2 = create("plgmi_discriminator", 10, image_size=32, channels=1, width=4)
    d2.load_state_dict(d.state_dict(), strict=True)
    d.eval(), d2.eval()
    with torch.no_grad():
        assert torch.allclose(d(x, y), d2(x, y), atol=1e-6)
        assert d(x, None).shape == (2, 1)
