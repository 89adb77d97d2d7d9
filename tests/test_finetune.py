"""Diff-MI fine-tuning (step 1c): layer selection, the change-rate probe, trainable-parameter isolation,
learning on a tiny setup, gradient checkpointing parity, resumption through the stage executor.

Everything runs on a tiny U-Net (8 channels, mult (1, 2), 16 px, one res block, 4 GroupNorm groups)
with 2-4 DPM-Solver steps, single-threaded, so the file takes seconds.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffmi_ray.config.methods import FinetuneConfig
from diffmi_ray.diffusion import linear_schedule
from diffmi_ray.models.unet import UNetModel, finetune_parameter_names, middle_block_layers
from diffmi_ray.training import finetune as ft

TINY = dict(image_size=16, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(), num_heads=1, norm_groups=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(cls=UNetModel, classes: int = 3, perturb: float = 0.05, seed: int = 0) -> UNetModel:
    """A tiny U-Net with every weight nonzero (zero-initialised layers would make Delta undefined and
    block the gradient), standing in for a pretrained CDM."""
    torch.manual_seed(seed)
    u = cls(classes, **TINY)
    with torch.no_grad():
        for p in u.parameters():
            p.add_(perturb * torch.randn_like(p))
    return u.eval()


class ResidualUNet(UNetModel):
    """eps = x + U-Net(x): keeps the few-step chain's outputs in the image range without pretraining
    (a random U-Net's eps ~ 0 makes x0 = x / alpha explode to |x| ~ 100). Same parameter names."""

    def forward(self, x, t, y=None):
        return x + super().forward(x, t, y)


class BrightnessT(nn.Module):
    """A target that is easy to fool: the class is decided by the mean brightness m of the image
    (dark -> 0, mid -> 1, bright -> 2). Features (B, 1) = m - 0.5."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-20.0], [0.0], [20.0]]))
            self.fc.bias.copy_(torch.tensor([-2.5, 0.0, -2.5]))

    def features(self, x):
        return (x.mean(dim=(1, 2, 3)) - 0.5).view(-1, 1)

    def features_and_logits(self, x):
        f = self.features(x)
        return f, self.fc(f)

    def forward(self, x):
        return self.fc(self.features(x))


def fake_ctx(**kw):
    store = {}
    ctx = SimpleNamespace(seed=0, device=torch.device("cpu"), rank=0, world_size=1, reports=[], logs=[],
                          saved=store,
                          save_checkpoint=lambda s, name="last.pt": store.__setitem__(name, s),
                          load_checkpoint=lambda name="last.pt": store.get(name),
                          check_finite=lambda name, v: None)
    ctx.report = ctx.reports.append
    ctx.log = ctx.logs.append
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def cfg(**kw) -> FinetuneConfig:
    base = dict(layers=[2, 4, 8, 10, 12], probe_steps=1, sampler_steps=2, guidance=3.0, lr=1e-3, batch_size=3,
                classes=3, max_epochs=1, acc_threshold=1.0, aug_copies=1, loss_k=1, loss_alpha=0.0)
    base.update(kw)
    return FinetuneConfig(**base)


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def changed(before: dict, m: nn.Module) -> set[str]:
    return {n for n, p in m.named_parameters() if not torch.equal(p.detach(), before[n])}


# ----------------------------------------------------------------------------------------------
# pure pieces


def test_select_layers_top_l_and_ties():
    rates = [0.1, 0.9, 0.2, 0.8, 0.3, 0.0, 0.05, 0.7, 0.01, 0.6, 0.02, 0.5, 0.4]
    assert ft.select_layers(rates, 5) == [2, 4, 8, 10, 12]
    assert ft.select_layers(rates, 1) == [2]
    assert ft.select_layers(rates, 13) == list(range(1, 14))
    # ties go to the lower index; the result is ascending
    assert ft.select_layers([0.5, 0.5, 0.5, 0.9], 2) == [1, 4]
    assert ft.select_layers([0.5, 0.5, 0.5, 0.9], 3) == [1, 2, 4]
    assert ft.select_layers([float("nan"), 0.1, 0.2], 2) == [2, 3]  # NaN ranks last
    with pytest.raises(ValueError):
        ft.select_layers(rates, 0)
    with pytest.raises(ValueError):
        ft.select_layers(rates, 14)


def test_change_rates_definition():
    u = tiny_unet()
    before = snapshot(u)
    layers = middle_block_layers(u)
    params = dict(u.named_parameters())
    # change layer 4 (second conv of ResBlock 1) by exactly 10 % of its norm, layer 7 by 50 %
    with torch.no_grad():
        for idx, frac in ((4, 0.1), (7, 0.5)):
            for n in layers[idx - 1][2]:
                params[n].mul_(1 + frac)
    rates = ft.change_rates(before, u)
    assert len(rates) == 13
    expect = [0.0] * 13
    expect[3], expect[6] = 0.1, 0.5
    assert rates == pytest.approx(expect, abs=1e-6)


def test_loss_target_indices():
    assert ft.loss_target_indices(10) == [3, 4, 5, 6, 7, 8, 9]            # official: d_3..d_9 (+ sample = 8)
    assert ft.loss_target_indices(20) == list(range(3, 20))               # official rule: skip order + 1 = 3
    assert ft.loss_target_indices(7) == [3, 4, 5, 6]
    assert ft.loss_target_indices(4) == [2, 3]                            # proportional below 7 steps
    assert ft.loss_target_indices(2) == [1]
    assert ft.loss_target_indices(1) == []
    assert ft.loss_target_indices(4, official=False) == [0, 1, 2, 3]


def test_epoch_batches_cover_every_class_once_and_shard_over_workers():
    one = ft.epoch_batches(10, 4, seed=0, epoch=0)
    assert [len(b.labels) for b in one] == [4, 4, 2]
    assert sorted(torch.cat([b.labels for b in one]).tolist()) == list(range(10))
    assert torch.cat([b.labels for b in ft.epoch_batches(10, 4, 0, 1)]).tolist() != \
        torch.cat([b.labels for b in one]).tolist()  # reshuffled per epoch
    # three workers: equal step counts, disjoint classes, the same union; a short batch pads
    shards = [ft.epoch_batches(10, 4, 0, 0, rank=r, world=3) for r in range(3)]
    assert {len(s) for s in shards} == {3}
    real = [c for s in shards for b in s if not b.padded for c in b.labels.tolist()]
    assert sorted(real) == list(range(10))
    assert sum(b.padded for s in shards for b in s) == 1  # last global batch has 2 classes for 3 workers


# ----------------------------------------------------------------------------------------------
# trainable-parameter isolation and the probe


def test_probe_measures_13_layers_touches_only_allowed_and_restores(monkeypatch):
    u = tiny_unet()
    before = snapshot(u)
    allowed = set(finetune_parameter_names(u, range(1, 14), include_label_emb=True))
    seen = {}
    real = ft.change_rates

    def spy(b, unet):
        seen["changed"] = changed(before, unet)
        return real(b, unet)

    monkeypatch.setattr(ft, "change_rates", spy)
    c = cfg(layers=5, probe_steps=2, lr=1e-2)
    rates = ft._probe(u, linear_schedule(), BrightnessT(), None, c, fake_ctx(), 3)
    assert len(rates) == 13 and all(r > 0 for r in rates)
    assert seen["changed"] and seen["changed"] <= allowed
    assert "label_emb.weight" in seen["changed"]
    assert all(n.startswith("middle_block.") or n == "label_emb.weight" for n in seen["changed"])
    assert changed(before, u) == set()  # pretrained weights restored bit for bit


def test_only_selected_parameters_change():
    u = tiny_unet()
    before = snapshot(u)
    c = cfg(layers=[2, 7], max_epochs=2, lr=1e-2)
    res = ft.run_finetune(u, linear_schedule(), BrightnessT(), None, c, fake_ctx())
    allowed = set(finetune_parameter_names(u, [2, 7], include_label_emb=True))
    assert allowed == {"label_emb.weight", "middle_block.0.in_layers.2.weight", "middle_block.0.in_layers.2.bias",
                       "middle_block.1.qkv.weight", "middle_block.1.qkv.bias"}
    assert changed(before, u) == allowed
    assert res.selected == [2, 7] and res.change_rate is None and res.epochs == 2
    assert not any(p.requires_grad for p in u.parameters())


def test_int_layers_runs_probe_then_trains_top_l_from_pretrained():
    u = tiny_unet()
    before = snapshot(u)
    ctx = fake_ctx()
    res = ft.run_finetune(u, linear_schedule(), BrightnessT(), None, cfg(layers=3, probe_steps=1), ctx)
    assert len(res.change_rate) == 13 and res.selected == ft.select_layers(res.change_rate, 3)
    assert changed(before, u) == set(finetune_parameter_names(u, res.selected))
    assert ctx.saved["last.pt"]["change_rate"] == res.change_rate


# ----------------------------------------------------------------------------------------------
# learning, p-reg, checkpointing


def test_loss_decreases_and_accuracy_rises_on_an_easy_target():
    u = tiny_unet(ResidualUNet)
    c = cfg(sampler_steps=4, lr=3e-2, max_epochs=10, acc_threshold=1.0)
    ctx = fake_ctx()
    res = ft.run_finetune(u, linear_schedule(), BrightnessT(), None, c, ctx)
    h = res.history
    assert [r["epoch"] for r in ctx.reports] == list(range(1, len(h) + 1))
    assert h[-1]["loss"] < h[0]["loss"] - 0.5
    assert res.final_acc > h[0]["acc"]
    assert res.stopped == "threshold" and res.final_acc == 1.0 and res.epochs < 10


def test_p_reg_term_and_aug_copies():
    T = BrightnessT()
    y = torch.tensor([0, 2])
    imgs = [torch.full((2, 1, 16, 16), -0.5), torch.full((2, 1, 16, 16), 0.6)]  # two targets, last = sample
    cent = torch.tensor([[0.3], [0.0], [-0.2]])
    loss0, correct = ft.classifier_loss(T, imgs, y, augment=None, copies=2, k=1, alpha=0.0, centroids=None)
    loss1, _ = ft.classifier_loss(T, imgs, y, augment=None, copies=2, k=1, alpha=2.0, centroids=cent)
    feats = torch.tensor([[-0.25], [-0.25], [0.3], [0.3]])  # (x + 1) / 2 - 0.5 of both targets
    preg = ((feats - cent[y.repeat(2)]) ** 2).mean()
    assert float((loss1 - loss0).detach()) == pytest.approx(2.0 * float(preg), rel=1e-5)
    assert correct.shape == (2, 2)
    assert correct.tolist() == [[0.0, 1.0], [0.0, 1.0]]  # the final sample (m = 0.8) is "bright" = class 2


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for on in (False, True):
        u = tiny_unet(ResidualUNet)
        names = finetune_parameter_names(u, [2, 4, 8, 10, 12])
        params = ft.set_trainable(u, names)
        s = ft.DifferentiableSampler(u, linear_schedule(), steps=4, checkpoint_steps=on)
        x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        y = torch.tensor([0, 1, 2])
        loss, _ = ft.classifier_loss(BrightnessT(), s(x, y), y, augment=None, copies=1, k=1, alpha=0.0,
                                     centroids=None)
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_augment_is_differentiable_and_stays_in_range():
    aug = ft.make_augment(16)
    x = torch.rand(4, 1, 16, 16, requires_grad=True)
    torch.manual_seed(0)
    v = aug(x).clamp(0, 1)
    assert v.shape == x.shape and 0 <= float(v.detach().min()) and float(v.detach().max()) <= 1
    v.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# the stage: artifact, change_rates.json, resume after a kill


def _build_parents(store, classes=3):
    from diffmi_ray.pipeline.stages.train_classifier import INFO_FILE, MODEL_FILE
    from diffmi_ray.models import create
    from diffmi_ray.training.cdm import save_cdm

    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY.items()}
    prior = tiny_unet(classes=classes)
    meta = {"model": "cdm_unet", "kwargs": kwargs, "num_classes": classes, "image_size": 16, "channels": 1,
            "diffusion": {"steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}, "source": "test"}
    with store.writer("train_prior", "p", {"stage": "train_prior"}) as out:
        save_cdm(out, prior, meta)
    torch.manual_seed(0)
    t = create("small_cnn", classes, in_channels=1, width=4)
    with store.writer("train_classifier", "t", {"stage": "train_classifier"}) as out:
        torch.save(t.state_dict(), out / MODEL_FILE)
        (out / INFO_FILE).write_text(json.dumps({"model": "small_cnn", "kwargs": {"in_channels": 1, "width": 4},
                                                 "num_classes": classes}))
    with store.writer("pseudo_labels", "l", {"stage": "pseudo_labels"}) as out:
        torch.save({"centroids": torch.randn(classes, t.feature_dim, generator=torch.Generator().manual_seed(0)),
                    "num_classes": classes}, out / "pseudo_labels.pt")
    return prior


def _instance(**overrides):
    from diffmi_ray.pipeline.plan import StageInstance

    c = cfg(layers=2, probe_steps=1, max_epochs=3, loss_alpha=1.0, aug_copies=2, **overrides).model_dump(mode="json")
    c.pop("enabled")
    return StageInstance("finetune_cdm", "ftkey", {"finetune": c, "seed": 0},
                         {"prior": ("train_prior", "p"), "target": ("train_classifier", "t"),
                          "pseudo_labels": ("pseudo_labels", "l")}, "finetune_cdm test")


class Killed(Exception):
    pass


def test_stage_writes_artifact_and_resumes_after_a_kill(tmp_path):
    from diffmi_ray.pipeline.execute import run_instance
    from diffmi_ray.pipeline.stages.finetune_cdm import CHANGE_RATES_FILE
    from diffmi_ray.pipeline.store import ArtifactStore
    from diffmi_ray.training import cdm

    inst = _instance()

    # uninterrupted reference run
    ref_store = ArtifactStore(tmp_path / "ref", cache_dir=tmp_path / "cache_ref")
    prior = _build_parents(ref_store)
    ref_reports = []
    ref = run_instance(inst, ref_store, device="cpu", report=ref_reports.append, log=lambda s: None)
    assert [r["epoch"] for r in ref_reports] == [1, 2, 3]
    assert ref["epochs"] == 3 and ref["resumed_from"] == 0 and len(ref["selected_layers"]) == 2

    # killed during epoch 2's report (its checkpoint is already saved), then rerun
    store = ArtifactStore(tmp_path / "run", cache_dir=tmp_path / "cache_run")
    _build_parents(store)

    def dying(m):
        if m["epoch"] == 2:
            raise Killed

    logs = []
    with pytest.raises(Killed):
        run_instance(inst, store, device="cpu", report=dying, log=logs.append)
    assert not store.is_done("finetune_cdm", "ftkey")
    assert any(s.startswith("probe:") for s in logs)
    logs.clear()
    reports = []
    got = run_instance(inst, store, device="cpu", report=reports.append, log=logs.append)
    assert [r["epoch"] for r in reports] == [3]
    assert not any(s.startswith("probe:") for s in logs)  # the probe result came from the checkpoint
    assert got["resumed_from"] == 2 and got["epochs"] == 3
    assert got["selected_layers"] == ref["selected_layers"] and got["change_rate"] == ref["change_rate"]
    assert got["final_acc"] == ref["final_acc"]
    assert store.is_done("finetune_cdm", "ftkey")

    # the artifact: a CDM that training.cdm.load reads; bit-identical to the uninterrupted run
    path = store.local_path("finetune_cdm", "ftkey")
    unet, sched, meta = cdm.load(path)
    ref_unet, _, _ = cdm.load(ref_store.local_path("finetune_cdm", "ftkey"))
    for (n, a), (_, b) in zip(unet.state_dict().items(), ref_unet.state_dict().items()):
        assert torch.equal(a, b), n
    assert meta["finetuned"] is True and meta["finetune_layers"] == got["selected_layers"]
    assert meta["model"] == "cdm_unet" and sched.num_timesteps == 1000
    diff = {n for n, p in unet.state_dict().items() if not torch.equal(p, prior.state_dict()[n])}
    assert diff == set(finetune_parameter_names(unet, got["selected_layers"]))

    rec = json.loads((path / CHANGE_RATES_FILE).read_text())
    assert rec["layers"] == list(range(1, 14)) and len(rec["change_rate"]) == 13
    assert rec["selected"] == got["selected_layers"]
    assert rec["names"][0] == "middle_block.0.in_layers.0" and rec["names"][7] == "middle_block.1.proj_out"

    # rerunning a finished instance returns its metrics without work
    assert run_instance(inst, store, device="cpu")["epochs"] == 3


def test_stage_explicit_layers_has_no_probe(tmp_path):
    from diffmi_ray.pipeline.execute import run_instance
    from diffmi_ray.pipeline.stages.finetune_cdm import CHANGE_RATES_FILE
    from diffmi_ray.pipeline.store import ArtifactStore

    store = ArtifactStore(tmp_path / "s", cache_dir=tmp_path / "cache")
    _build_parents(store)
    inst = _instance(**{"classes": 2})
    c = dict(inst.config)
    c["finetune"] = dict(c["finetune"], layers=[12, 4], max_epochs=1)
    inst = type(inst)(inst.stage, "ftkey2", c, inst.parents, inst.label)
    got = run_instance(inst, store, device="cpu", log=lambda s: None)
    rec = json.loads((store.local_path("finetune_cdm", "ftkey2") / CHANGE_RATES_FILE).read_text())
    assert rec["change_rate"] is None and rec["selected"] == [4, 12] and got["selected_layers"] == [4, 12]
    assert got["classes"] == 2


# ----------------------------------------------------------------------------------------------
# DDP (two gloo workers on the CPU)


def _ddp_worker(rank, world, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        u = tiny_unet(ResidualUNet)
        ctx = fake_ctx(rank=rank, world_size=world)
        res = ft.run_finetune(u, linear_schedule(), BrightnessT(), None, cfg(layers=[4, 8], max_epochs=2, lr=1e-2,
                                                                              classes=3, batch_size=3), ctx)
        torch.save({"acc": [r["acc"] for r in res.history],
                    "emb": u.label_emb.weight.detach().clone()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_workers_stay_in_sync(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert torch.equal(a["emb"], b["emb"])  # gradients were all-reduced: identical weights
    assert a["acc"] == b["acc"]             # accuracy all-reduced over workers
