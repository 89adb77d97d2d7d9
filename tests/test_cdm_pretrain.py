"""CDM pretraining (diffmi_ray.training.cdm): loss, null-label rule, resume, save/load, released-checkpoint checks."""

from __future__ import annotations

import json

import pytest
import torch

from diffmi_ray.config.methods import CDMPriorConfig, UNetConfig
from diffmi_ray.errors import UserError
from diffmi_ray.models import create
from diffmi_ray.pipeline.execute import run_instance
from diffmi_ray.pipeline.plan import StageInstance
from diffmi_ray.pipeline.store import ArtifactStore
from diffmi_ray.training import cdm
from diffmi_ray.training.cdm import dequantize, load, null_batch, save_cdm, unet_kwargs


pytestmark = pytest.mark.usefixtures("one_thread")

TINY_UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
             "num_heads": 1}


def _prior(**over) -> dict:
    cfg = {"unet": TINY_UNET, "iterations": 20, "batch_size": 8, "lr": 2e-3, "ema_decay": 0.9,
           "checkpoint_every": 5, "hflip": True}
    cfg.update(over)
    return CDMPriorConfig.model_validate(cfg).model_dump(mode="json")


DATA = {"private": {"dataset": "mnist5k", "classes": [0, 1, 2], "max_per_class": 10},
        "public": {"dataset": "mnist5k", "classes": [5, 6, 7], "max_per_class": 8},
        "image_size": 16, "channels": 1, "test_fraction": 0.2}


def _split_and_target(store: ArtifactStore):
    """A finished split (mnist5k at 16 px, 24 public images) and a hand-written small_cnn target artifact."""
    split = StageInstance("split", "split0", {"data": DATA, "seed": 0}, {}, "split")
    run_instance(split, store, device="cpu", log=lambda s: None)
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "image_size": 16, "width": 8}
    model = create("small_cnn", 3, **kwargs).eval()
    record = {"stage": "train_classifier", "key": "target0", "label": "t", "config": {}, "parents": {}}
    with store.writer("train_classifier", "target0", record) as out:
        torch.save(model.state_dict(), out / "model.pt")
        (out / "model.json").write_text(json.dumps({"model": "small_cnn", "kwargs": kwargs, "num_classes": 3,
                                                    "image_size": 16, "channels": 1}))
    return split, StageInstance("train_classifier", "target0", {}, {"split": split.id}, "target")


def _chain(store: ArtifactStore, prior: dict, key: str = "cdm0") -> StageInstance:
    """split -> target (hand-written) -> pseudo_labels -> the train_prior instance (not run)."""
    pytest.importorskip("mlxtend")
    split, target = _split_and_target(store)
    pl = StageInstance("pseudo_labels", "pl0", {"pseudo_labels": {"top_n": 6}, "seed": 0},
                       {"split": split.id, "target": target.id}, "pl")
    run_instance(pl, store, device="cpu", log=lambda s: None)
    return StageInstance("train_prior", key, {"kind": "cdm", "prior": prior, "image_size": 16, "channels": 1,
                                              "seed": 0},
                         {"split": split.id, "pseudo_labels": pl.id, "target": target.id}, "prior cdm")


class _Spy:
    """Wraps cdm.eps_loss: records each step's labels and loss."""

    def __init__(self, monkeypatch):
        self.labels, self.losses = [], []
        real = cdm.eps_loss

        def spy(model, sched, x0, y, t, noise, reduction="mean"):
            loss = real(model, sched, x0, y, t, noise, reduction)
            self.labels.append(y.detach().cpu().clone())
            self.losses.append(float(loss.detach()))
            return loss

        monkeypatch.setattr(cdm, "eps_loss", spy)


def test_null_batch_rule_is_seeded_with_probability_p():
    draws = [null_batch(7, s, 0.1) for s in range(1, 4001)]
    assert draws == [null_batch(7, s, 0.1) for s in range(1, 4001)]  # deterministic
    assert 0.085 < sum(draws) / len(draws) < 0.115
    assert draws != [null_batch(8, s, 0.1) for s in range(1, 4001)]  # depends on the seed
    assert not any(null_batch(0, s, 0.0) for s in range(100))
    assert all(null_batch(0, s, 1.0) for s in range(100))


def test_dequantize_stays_in_unit_range():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3).repeat(200, 1, 1, 1)
    d = dequantize(x, torch.Generator().manual_seed(0))
    assert d.min() >= 0 and d.max() <= 1
    assert ((d - x * 255 / 256) >= 0).all() and ((d - x * 255 / 256) <= 1 / 256).all()


def test_unet_kwargs_adapt_groupnorm_and_reject_paper_model_geometry():
    kw = unet_kwargs(UNetConfig.model_validate(TINY_UNET), 16, 1)
    assert kw["norm_groups"] == 8 and kw["image_size"] == 16 and kw["in_channels"] == 1
    assert unet_kwargs(UNetConfig(model_channels=32, channel_mult=[1, 2, 2]), 32, 1)["norm_groups"] == 32
    with pytest.raises(UserError):
        unet_kwargs(UNetConfig(model="diffmi_unet_64"), 32, 1)


def test_loss_decreases_and_null_label_is_whole_batch(tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    store = ArtifactStore(tmp_path)
    inst = _chain(store, _prior(iterations=40, null_prob=0.25, checkpoint_every=100))
    metrics = run_instance(inst, store, device="cpu", log=lambda s: None)
    assert metrics["steps"] == 40 and metrics["resumed_from"] == 0 and metrics["examples"] == 18
    assert len(spy.losses) == 40
    first, last = sum(spy.losses[:5]) / 5, sum(spy.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    null = 3  # num_classes
    for step, y in enumerate(spy.labels, start=1):
        if null_batch(0, step, 0.25):
            assert (y == null).all()
        else:
            assert (y < null).all()
    assert 3 <= sum((y == null).all().item() for y in spy.labels) <= 18


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tmp_path):
    prior = _prior(iterations=20, checkpoint_every=5)
    store = ArtifactStore(tmp_path / "a")
    inst = _chain(store, prior)

    class Kill(Exception):
        pass

    seen = []

    def report(m):
        seen.append(m["step"])
        if m["step"] == 10:
            raise Kill()

    with pytest.raises(Kill):
        run_instance(inst, store, device="cpu", report=report, log=lambda s: None)
    assert seen == [5, 10] and not store.is_done("train_prior", inst.key)
    seen.clear()
    metrics = run_instance(inst, store, device="cpu", report=lambda m: seen.append(m["step"]), log=lambda s: None)
    assert metrics["resumed_from"] == 10 and metrics["steps"] == 20 and seen == [15]
    resumed, _, _ = load(store.local_path("train_prior", inst.key))

    store_b = ArtifactStore(tmp_path / "b")
    inst_b = _chain(store_b, prior)
    run_instance(inst_b, store_b, device="cpu", log=lambda s: None)
    straight, _, _ = load(store_b.local_path("train_prior", inst_b.key))
    for (n, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_save_load_roundtrip(tmp_path):
    meta = {"model": "cdm_unet", "kwargs": unet_kwargs(UNetConfig.model_validate(TINY_UNET), 16, 1),
            "num_classes": 4, "image_size": 16, "channels": 1,
            "diffusion": {"steps": 500, "beta_start": 1e-4, "beta_end": 0.02}}
    unet = cdm.build_unet(meta)
    torch.nn.init.normal_(unet.out[-1].weight, std=0.1)  # non-zero output layer
    save_cdm(tmp_path, unet, meta)
    loaded, sched, meta2 = load(tmp_path)
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    assert sched.num_timesteps == 500 and meta2["num_classes"] == 4
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 400]), torch.tensor([0, 4])
    unet.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, y), unet(x, t, y))
    trainable, _, _ = load(tmp_path, trainable=True)
    assert all(p.requires_grad for p in trainable.parameters())
    with pytest.raises(ValueError):
        save_cdm(tmp_path / "x", unet, {"model": "cdm_unet"})


def test_released_checkpoint_needs_paper_geometry(tmp_path):
    store = ArtifactStore(tmp_path)
    inst = _chain(store, _prior(checkpoint=str(tmp_path / "ema_0.9999_050000.pt")))
    with pytest.raises(UserError, match="64 px RGB"):
        run_instance(inst, store, device="cpu", log=lambda s: None)
