"""Latent diffusion (Table VI): the codec, and the CDM stages end to end with a small autoencoder.

The autoencoders are tiny diffusers models, randomly initialised or trained for a few steps here
(the real path downloads a pretrained one; nothing here touches the network).
"""

from __future__ import annotations

import json

import pytest
import torch

from diffmi_ray.attacks import get_attack
from diffmi_ray.attacks.base import AttackInputs
from diffmi_ray.config.methods import CDMPriorConfig, FinetuneConfig, LatentConfig
from diffmi_ray.errors import UserError
from diffmi_ray.models.autoencoder import LatentCodec, build_autoencoder, latent_geometry
from diffmi_ray.pipeline.execute import run_instance
from diffmi_ray.pipeline.plan import StageInstance
from diffmi_ray.pipeline.store import ArtifactStore
from diffmi_ray.training import cdm
from tests.test_cdm_pretrain import DATA, TINY_UNET, _chain

ARCH = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 2, "norm_num_groups": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_codec(image_size=16, output_size=None, scale=1.0) -> LatentCodec:
    torch.manual_seed(0)
    ae = build_autoencoder(LatentConfig(arch=ARCH), channels=1, image_size=image_size)
    return LatentCodec(ae, image_size, scale, output_size)


def test_codec_shapes_scale_and_gradient_through_the_decoder():
    codec = _tiny_codec(image_size=16, output_size=12, scale=2.0)
    assert codec.kind == "kl" and codec.downsample == 2 and codec.latent_shape == (2, 8, 8)
    x = torch.rand(3, 1, 12, 12)
    z = codec.encode(x)  # resized 12 -> 16 px, then encoded
    assert z.shape == (3, 2, 8, 8)
    assert torch.allclose(z, 2.0 * codec.raw_latents(x))
    zz = z.clone().requires_grad_(True)
    img = codec.decode(zz)
    assert img.shape == (3, 1, 12, 12) and codec.decode(z, size=16).shape == (3, 1, 16, 16)
    img.sum().backward()
    assert zz.grad is not None and zz.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in codec.parameters())
    with torch.no_grad():  # decode divides by the scale: same image as the raw latents through the bare decoder
        ref = codec.ae.decode(codec.raw_latents(x)).sample
        assert torch.allclose(codec.decode(z, size=16), ref, atol=1e-5)
    assert torch.allclose(codec.encode_all(x, batch_size=2)[0], z, atol=1e-6)


def test_vq_codec_decodes_with_a_straight_through_gradient():
    from diffusers import VQModel

    torch.manual_seed(0)
    ae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), latent_channels=3,
                 num_vq_embeddings=16, norm_num_groups=4, sample_size=16)
    codec = LatentCodec(ae, 16, 1.0)
    assert codec.kind == "vq" and codec.latent_shape == (3, 4, 4)  # f = 4: LDM vq-f4 geometry
    z = codec.encode(torch.rand(2, 3, 16, 16)).requires_grad_(True)
    codec.decode(z).sum().backward()
    assert z.grad.abs().sum() > 0


def test_latent_geometry_and_config_rules(tmp_path):
    assert latent_geometry(LatentConfig(arch=ARCH), 16) == (8, 2, 2)
    assert latent_geometry(LatentConfig(image_size=256), 224) == (64, 3, 4)  # the default arch: kl-f4
    assert latent_geometry(LatentConfig(pretrained="some-org/some-vae"), 64) is None  # Hub: known at run time
    _tiny_codec().ae.save_pretrained(tmp_path / "ae" / "vae")
    assert latent_geometry(LatentConfig(pretrained=str(tmp_path / "ae"), subfolder="vae"), 32) == (16, 2, 2)
    with pytest.raises(ValueError, match="latent"):
        CDMPriorConfig(checkpoint="x.pt", latent=LatentConfig())
    with pytest.raises(UserError, match="norm_num_groups"):
        build_autoencoder(LatentConfig(arch={**ARCH, "norm_num_groups": 3}), 1, 16)


def test_config_check_uses_the_latent_geometry(tmp_path):
    from diffmi_ray.config.checks import check_point
    from diffmi_ray.config.experiment import ExperimentConfig, ProtocolConfig

    base = {"method": "diff_mi",
            "data": {"private": {"dataset": "mnist5k", "classes": [0, 1, 2]},
                     "public": {"dataset": "mnist5k", "classes": [5, 6, 7]}, "image_size": 32, "channels": 1},
            "target": {"model": "small_cnn"},
            "diff_mi": {"prior": {"unet": {**TINY_UNET, "attention_resolutions": [16]},
                                  "latent": {"arch": ARCH}}}}
    protocol = ProtocolConfig.model_validate({"classes": 3, "images_per_class": 1, "eval": {"model": "small_resnet"}})
    ok = check_point(ExperimentConfig.model_validate(base), protocol)
    assert not [p for p in ok if p[0].startswith("diff_mi.prior")], ok  # 16 is a feature size of the 16 px latent
    base["diff_mi"]["prior"]["unet"]["attention_resolutions"] = [32]  # a pixel size, not a latent one
    bad = check_point(ExperimentConfig.model_validate(base), protocol)
    assert any(p[0] == "diff_mi.prior.unet.attention_resolutions" and "latent size" in p[1] for p in bad), bad


def _latent_prior(**latent) -> dict:
    lat = {"arch": ARCH, "iterations": 30, "batch_size": 8, "lr": 3e-3, "encode_batch_size": 7, **latent}
    return CDMPriorConfig.model_validate({"unet": TINY_UNET, "iterations": 12, "batch_size": 8, "lr": 2e-3,
                                         "ema_decay": 0.9, "checkpoint_every": 4, "hflip": True,
                                         "latent": lat}).model_dump(mode="json")


def test_latent_cdm_trains_resumes_finetunes_and_attacks(tmp_path, monkeypatch):
    """train_prior (autoencoder + latent CDM, killed and resumed) -> finetune_cdm -> the Diff-MI attack."""
    from diffmi_ray.training import autoencoder as ae_mod

    calls = []
    real_train = ae_mod.train_autoencoder
    monkeypatch.setattr(ae_mod, "train_autoencoder", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    store = ArtifactStore(tmp_path / "a")
    prior = _chain(store, _latent_prior(), key="lat0")  # 16 px data -> 8 x 8 x 2 latents

    class Kill(Exception):
        pass

    def report(m):
        if m["step"] == 8:
            raise Kill()

    with pytest.raises(Kill):
        run_instance(prior, store, device="cpu", report=report, log=lambda s: None)
    m = run_instance(prior, store, device="cpu", log=lambda s: None)
    assert calls == [1], "the resumed run must take the autoencoder from the checkpoint, not retrain it"
    assert m["resumed_from"] == 8 and m["autoencoder"] == "from checkpoint"
    path = store.local_path("train_prior", prior.key)
    unet, _, meta = cdm.load(path)
    codec = cdm.load_codec(path, meta)
    assert (meta["image_size"], meta["channels"]) == (8, 2) and unet.in_channels == 2
    assert meta["latent"]["data_image_size"] == 16 and (path / "autoencoder" / "config.json").is_file()

    # the same run without the interruption gives the same autoencoder, scale and U-Net
    store_b = ArtifactStore(tmp_path / "b")
    prior_b = _chain(store_b, _latent_prior(), key="lat0")
    run_instance(prior_b, store_b, device="cpu", log=lambda s: None)
    path_b = store_b.local_path("train_prior", prior_b.key)
    unet_b, _, meta_b = cdm.load(path_b)
    assert meta_b["latent"]["scaling_factor"] == pytest.approx(meta["latent"]["scaling_factor"], rel=1e-6)
    for (n, a), (_, b) in zip(unet.state_dict().items(), unet_b.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n

    # scale_by_std: the CDM's training latents have unit std
    from diffmi_ray.config.data import DataConfig
    from diffmi_ray.data.splits import materialize
    from diffmi_ray.pipeline.stages.split import load as load_split

    split = load_split(store.local_path("split", "split0"))
    public = materialize(split, DataConfig.model_validate(DATA), parts=("public",)).public_x
    assert float(codec.encode_all(public, 16)[0].std()) == pytest.approx(1.0, rel=0.15)

    # fine-tune through the decoder, then attack
    ft_cfg = FinetuneConfig(layers=2, probe_steps=1, sampler_steps=3, batch_size=3, max_epochs=1, loss_k=1,
                            loss_alpha=0.0, aug_copies=1).model_dump(mode="json")
    ft_cfg.pop("enabled")
    ft = StageInstance("finetune_cdm", "ft0", {"finetune": ft_cfg, "seed": 0},
                       {"prior": prior.id, "target": prior.parents["target"],
                        "pseudo_labels": prior.parents["pseudo_labels"]}, "ft")
    m = run_instance(ft, store, device="cpu", log=lambda s: None)
    assert m["epochs"] == 1 and len(m["selected_layers"]) == 2
    ft_path = store.local_path("finetune_cdm", "ft0")
    ft_unet, _, ft_meta = cdm.load(ft_path)
    assert ft_meta["finetuned"] and cdm.load_codec(ft_path, ft_meta) is not None
    changed = [n for (n, a), (_, b) in zip(unet.state_dict().items(), ft_unet.state_dict().items())
               if not torch.equal(a, b)]
    assert changed and all(n.startswith(("label_emb", "middle_block", "input_blocks", "output_blocks"))
                           for n in changed)

    from diffmi_ray.pipeline.stages.train_classifier import load_classifier

    target = load_classifier(store.local_path("train_classifier", "target0"), "cpu")
    inputs = AttackInputs(target=target, num_classes=3, image_shape=(1, 16, 16), generator_dir=ft_path,
                          generator_config={}, log=lambda s: None)
    attack = get_attack("diff_mi")({"iterations": 3, "k": 1, "alpha": 0.0, "ddim_steps": 2, "batch_size": 2,
                                    "aug_copies": 1, "pgd": {"iterations": 1}}, inputs)
    labels = torch.tensor([0, 1, 2])
    out = attack.invert(labels, seed=0)
    assert out.images.shape == (3, 1, 16, 16) and 0 <= out.images.min() and out.images.max() <= 1
    again = attack.invert(labels[:1], seed=0)  # an image depends on (seed, class, repeat) only
    assert torch.allclose(again.images[0], out.images[0], atol=1e-5)
    inputs.image_shape = (1, 12, 12)
    with pytest.raises(UserError, match="makes"):
        get_attack("diff_mi")({"k": 1, "alpha": 0.0}, inputs)


def test_pretrained_autoencoder_from_a_local_folder(tmp_path):
    """latent.pretrained: a diffusers folder is loaded (not trained) and a fixed scaling_factor is used."""
    _tiny_codec().ae.save_pretrained(tmp_path / "vae_dir")
    store = ArtifactStore(tmp_path / "s")
    prior = _chain(store, _latent_prior(pretrained=str(tmp_path / "vae_dir"), scaling_factor=0.5, iterations=0),
                   key="pre0")
    m = run_instance(prior, store, device="cpu", log=lambda s: None)
    assert "autoencoder" not in m
    path = store.local_path("train_prior", prior.key)
    meta = json.loads((path / "model.json").read_text())
    assert meta["latent"]["scaling_factor"] == 0.5 and meta["latent"]["pretrained"] == str(tmp_path / "vae_dir")
    ref = _tiny_codec().ae.state_dict()
    got = cdm.load_codec(path, meta).ae.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    bad = _chain(ArtifactStore(tmp_path / "t"), _latent_prior(pretrained=str(tmp_path / "nowhere")), key="bad0")
    with pytest.raises(UserError, match="latent.pretrained"):
        run_instance(bad, ArtifactStore(tmp_path / "t"), device="cpu", log=lambda s: None)


def test_encode_all_of_lazy_images_and_flip():
    from diffmi_ray.config.data import DataSide
    from diffmi_ray.data.splits import LazyImages, load_source

    codec = _tiny_codec(image_size=16)
    lazy = LazyImages(load_source(DataSide(dataset="mnist5k")), range(10), 16, 1)
    x = lazy.load()
    assert torch.allclose(codec.encode_all(lazy, 4)[0], codec.encode_all(x, 10)[0], atol=1e-6)
    assert codec.encode_all(lazy, 4)[1] is None
    assert torch.allclose(codec.encode_all(lazy, 3, mirrored=True)[1], codec.encode(x.flip(-1)), atol=1e-6)
