"""GAN priors of GMI (gan_wgangp), KED-MI (gan_kedmi) and PLG-MI (gan_plgmi) at tiny scale.

Covers: every prior trains through the stage executor with finite losses and writes a loadable
artifact; a killed run resumes at its last checkpoint and ends where an uninterrupted run ends;
community checkpoints in the KED-MI and PLG-MI file formats load instead of training; the loss
functions match hand-computed values; the shared data stream and augmentation behave.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffmi_ray.attacks import latent
from diffmi_ray.config.methods import GMIPriorConfig, KEDMIPriorConfig, PLGMIPriorConfig
from diffmi_ray.errors import UserError
from diffmi_ray.models import create
from diffmi_ray.pipeline.execute import run_instance
from diffmi_ray.pipeline.plan import StageInstance
from diffmi_ray.pipeline.store import ArtifactStore
from diffmi_ray.training import gan_kedmi, gan_plgmi, gan_wgangp

SIZE, CH = 32, 1

DATA = {"private": {"dataset": "mnist5k", "classes": [0, 1, 2], "max_per_class": 20},
        "public": {"dataset": "mnist5k", "classes": [5, 6, 7], "max_per_class": 20},
        "image_size": SIZE, "channels": CH, "test_fraction": 0.2}
TARGET = {"model": "small_cnn", "model_kwargs": {"width": 8},
          "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "hflip": False}}
TINY_TRAIN = {"iterations": 4, "batch_size": 8, "n_critic": 2, "checkpoint_every": 2}


def _inst(stage: str, key: str, config: dict, parents: dict[str, StageInstance] | None = None) -> StageInstance:
    return StageInstance(stage, key, config, {r: p.id for r, p in (parents or {}).items()}, f"{stage} test")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A store with a tiny split, a (briefly trained) small_cnn target and its top-5 pseudo-labels."""
    torch.set_num_threads(1)
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    split = _inst("split", "split0", {"data": DATA, "seed": 0})
    target = _inst("train_classifier", "target0", {"classifier": TARGET, "image_size": SIZE, "channels": CH,
                                                   "seed": 0}, {"split": split})
    pl = _inst("pseudo_labels", "pl0", {"pseudo_labels": {"top_n": 5}, "seed": 0}, {"split": split, "target": target})
    quiet = dict(device="cpu", log=lambda s: None)
    for inst in (split, target, pl):
        run_instance(inst, store, **quiet)
    return {"store": store, "split": split, "target": target, "pseudo_labels": pl}


PRIORS = {
    "gan_wgangp": (GMIPriorConfig, {"arch": {"width": 8, "z_dim": 16}}, ("split",)),
    "gan_kedmi": (KEDMIPriorConfig, {"arch": {"discriminator": "kedmi_discriminator", "width": 8, "z_dim": 16}},
                  ("split", "target")),
    "gan_plgmi": (PLGMIPriorConfig, {"arch": {"generator": "plgmi_generator", "discriminator": "plgmi_discriminator",
                                              "width": 8, "z_dim": 16}}, ("split", "target", "pseudo_labels")),
}
MODULES = {"gan_wgangp": gan_wgangp, "gan_kedmi": gan_kedmi, "gan_plgmi": gan_plgmi}


def prior_inst(env, kind: str, key: str, train: dict | None = None, **prior_extra) -> StageInstance:
    cls, prior, roles = PRIORS[kind]
    prior = {**prior, "train": {**TINY_TRAIN, **(train or {})}, **prior_extra}
    cfg = cls.model_validate(prior).model_dump(mode="json")
    return _inst("train_prior", key, {"kind": kind, "prior": cfg, "image_size": SIZE, "channels": CH, "seed": 0},
                 {r: env[r] for r in roles})


def run_quiet(inst, store, report=None):
    return run_instance(inst, store, device="cpu", log=lambda s: None, report=report)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("kind", list(PRIORS))
def test_prior_trains_and_loads(env, kind):
    reports = []
    m = run_quiet(prior_inst(env, kind, f"{kind}-train"), env["store"], report=reports.append)
    assert m["source"] == "trained" and m["iterations"] == 4 and m["resumed_from"] == 0
    losses = {k: v for k, v in m.items() if k.startswith("loss")}
    assert losses and all(math.isfinite(v) for v in losses.values())
    assert [r["step"] for r in reports] == [2, 4]

    path = env["store"].local_path("train_prior", f"{kind}-train")
    G, D, meta = MODULES[kind].load(path, "cpu")
    assert meta["kind"] == kind and meta["z_dim"] == 16 and (meta["image_size"], meta["channels"]) == (SIZE, CH)
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    z = G.sample_latent(3, torch.Generator().manual_seed(0))
    x = G(z, torch.tensor([0, 1, 2])) if G.conditional else G(z)
    u = G.to_unit(x)
    assert u.shape == (3, CH, SIZE, SIZE) and u.min() >= 0 and u.max() <= 1
    assert D is not None
    if kind != "gan_wgangp":
        assert meta["num_classes"] == 3


@pytest.mark.parametrize("kind", list(PRIORS))
def test_resume_after_kill_continues_the_step_count(env, kind):
    class Killed(Exception):
        pass

    def kill_at_4(metrics):
        if metrics["step"] == 4:
            raise Killed

    train = {"iterations": 6}
    inst = prior_inst(env, kind, f"{kind}-resume", train=train)
    with pytest.raises(Killed):
        run_quiet(inst, env["store"], report=kill_at_4)
    assert not env["store"].is_done("train_prior", inst.key)
    reports = []
    m = run_quiet(inst, env["store"], report=reports.append)
    assert m["resumed_from"] == 4 and m["iterations"] == 6
    assert [r["step"] for r in reports] == [6]

    # the resumed run ends exactly where an uninterrupted one does
    ref = prior_inst(env, kind, f"{kind}-straight", train=train)
    run_quiet(ref, env["store"])
    a = torch.load(env["store"].local_path("train_prior", inst.key) / "generator.pt", weights_only=True)
    b = torch.load(env["store"].local_path("train_prior", ref.key) / "generator.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_diverging_loss_fails_the_stage(env):
    inst = prior_inst(env, "gan_wgangp", "nan", lambda_gp=float("inf"))
    with pytest.raises(Exception, match="became"):
        run_quiet(inst, env["store"])


# ------------------------------------------------------------------------------------- community checkpoints


def test_community_checkpoints_load_in_kedmi_format(env, tmp_path):
    """KED-MI / GMI files: {'state_dict': {'module.' + k: v}} for G and D."""
    G = create("dcgan_generator", 0, image_size=SIZE, channels=CH, width=8, z_dim=16)
    D = create("kedmi_discriminator", 3, image_size=SIZE, channels=CH, width=8)
    with torch.no_grad():
        for p in list(G.parameters()) + list(D.parameters()):
            p.normal_()
    torch.save({"state_dict": {"module." + k: v for k, v in G.state_dict().items()}}, tmp_path / "G.tar")
    torch.save({"state_dict": {"module." + k: v for k, v in D.state_dict().items()}}, tmp_path / "D.tar")
    inst = prior_inst(env, "gan_kedmi", "community-kedmi",
                      train={"generator_checkpoint": str(tmp_path / "G.tar"),
                             "discriminator_checkpoint": str(tmp_path / "D.tar")})
    m = run_quiet(inst, env["store"])
    assert m["source"] == "checkpoint"
    G2, D2, meta = gan_kedmi.load(env["store"].local_path("train_prior", inst.key), "cpu")
    for a, b in ((G, G2), (D, D2)):
        for k, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[k], v)
    assert meta["source"]["generator"].endswith("G.tar")

    # GMI with a generator only: the artifact has no discriminator
    inst = prior_inst(env, "gan_wgangp", "community-gmi-g", train={"generator_checkpoint": str(tmp_path / "G.tar")})
    run_quiet(inst, env["store"])
    G3, D3, meta = gan_wgangp.load(env["store"].local_path("train_prior", inst.key), "cpu")
    assert D3 is None and meta["discriminator"] is None
    torch.testing.assert_close(G3.state_dict()["l1.0.weight"], G.state_dict()["l1.0.weight"])


def test_community_checkpoints_load_in_plgmi_format(env, tmp_path):
    """PLG-MI files: {'model': state_dict, 'opt': {...}} (no prefix)."""
    G = create("plgmi_generator", 3, image_size=SIZE, channels=CH, width=8, z_dim=16)
    with torch.no_grad():
        for p in G.parameters():
            p.normal_()
    torch.save({"model": G.state_dict(), "opt": {}}, tmp_path / "gen_latest.pth.tar")
    inst = prior_inst(env, "gan_plgmi", "community-plgmi",
                      train={"generator_checkpoint": str(tmp_path / "gen_latest.pth.tar")})
    run_quiet(inst, env["store"])
    G2, D2, _ = gan_plgmi.load(env["store"].local_path("train_prior", inst.key), "cpu")
    assert D2 is None
    for k, v in G.state_dict().items():
        torch.testing.assert_close(G2.state_dict()[k], v)

    # a file that does not fit names the offending keys
    torch.save({"model": {"nonsense": torch.zeros(1)}, "opt": {}}, tmp_path / "bad.tar")
    bad = prior_inst(env, "gan_plgmi", "community-bad", train={"generator_checkpoint": str(tmp_path / "bad.tar")})
    with pytest.raises(UserError, match="nonsense"):
        run_quiet(bad, env["store"])


def test_fixed_size_community_model_rejects_other_geometry(env):
    inst = prior_inst(env, "gan_wgangp", "geom", arch={"generator": "gmi_generator_64", "width": 8, "z_dim": 100})
    with pytest.raises(UserError, match="image sizes"):
        run_quiet(inst, env["store"])


# ----------------------------------------------------------------------------------------------- loss maths


def test_kedmi_losses_match_hand_computation():
    torch.manual_seed(0)
    lab, t, unl, fake = (torch.randn(4, 3) for _ in range(4))
    l_lab, l_unlab = gan_kedmi.discriminator_loss(lab, t, unl, fake)
    p = torch.softmax(t, 1)
    ref_lab = -(p * torch.log_softmax(lab, 1)).sum() / 4
    sig = torch.sigmoid
    lse_u, lse_f = torch.logsumexp(unl, 1), torch.logsumexp(fake, 1)
    # unlabelled term = 1/2 (-log sigmoid(lse real) - log(1 - sigmoid(lse fake)))
    ref_unlab = 0.5 * (-torch.log(sig(lse_u)).mean() - torch.log(1 - sig(lse_f)).mean())
    torch.testing.assert_close(l_lab, ref_lab)
    torch.testing.assert_close(l_unlab, ref_unlab)

    ff, fr = torch.randn(4, 5), torch.randn(6, 5)
    loss, h = gan_kedmi.generator_loss(ff, fr, fake, entropy_weight=0.5, entropy_scale=4.0)
    ref_h = -(torch.softmax(fake, 1) * torch.log_softmax(fake, 1)).sum()  # official: summed over the batch of 4
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(loss, (ff.mean(0) - fr.mean(0)).abs().mean() + 0.5 * ref_h)


def test_hinge_and_gradient_penalty():
    torch.testing.assert_close(gan_plgmi.hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])),
                               torch.tensor(0.25 + 0.5))

    class Lin(torch.nn.Module):  # D(x) = sum(w * x): gradient w everywhere, penalty (||w|| - 1)^2
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((1, 1, 2, 2), 1.0))

        def forward(self, x):
            return (self.w * x).flatten(1).sum(1)

    gp = gan_wgangp.gradient_penalty(Lin(), torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2), torch.rand(3, 1, 1, 1))
    torch.testing.assert_close(gp, torch.tensor((2.0 - 1.0) ** 2))


# --------------------------------------------------------------------------------------- shared pieces


def test_batch_stream_is_deterministic_and_seekable():
    x = torch.arange(10).float()
    s = gan_wgangp.BatchStream(x, batch_size=3, seed=1)
    seq = [s.next()[0] for _ in range(7)]
    assert s.per_epoch == 3  # 10 // 3, remainder dropped
    assert sorted(torch.cat(seq[:3]).tolist()) == sorted(set(torch.cat(seq[:3]).tolist()))  # no repeats in an epoch
    s2 = gan_wgangp.BatchStream(x, batch_size=3, seed=1)
    s2.seek(4)
    torch.testing.assert_close(s2.next()[0], seq[4])
    assert not torch.equal(torch.cat(seq[:3]), torch.cat(seq[3:6]))  # epochs reshuffle


def test_total_iterations():
    tc = GMIPriorConfig().train
    assert gan_wgangp.total_iterations(tc, 640) == 280 * 10 // 5
    assert gan_wgangp.total_iterations(tc.model_copy(update={"iterations": 7}), 640) == 7


def test_augment_identity_and_ranges():
    x = torch.rand(4, 3, 16, 16)
    ident = torch.tensor([[0.99, 0.5, 0.5, 0.0, 1.0, 0.5, 0.5, 0.9, 0.9, 0.5]]).repeat(4, 1)
    # colour off (u0 >= p), factor 1, full-size crop, no flip, no rotation: identity
    torch.testing.assert_close(latent.augment(x, ident), x, atol=1e-5, rtol=0)
    flip = ident.clone()
    flip[:, 7] = 0.0
    torch.testing.assert_close(latent.augment(x, flip), x.flip(-1), atol=1e-5, rtol=0)
    out = latent.augment(x, torch.rand(4, latent.AUG_DRAWS, generator=torch.Generator().manual_seed(0)))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    # per-image parameters: image 0's result does not depend on the others
    u = torch.rand(4, latent.AUG_DRAWS, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(latent.augment(x, u)[:1], latent.augment(x[:1], u[:1]))


def test_model_json_fields(env):
    path = env["store"].local_path("train_prior", "gan_plgmi-train")
    info = json.loads((path / "model.json").read_text())
    for k in ("generator", "generator_kwargs", "discriminator", "discriminator_kwargs", "z_dim", "num_classes",
              "out_range", "conditional", "source"):
        assert k in info
    assert info["out_range"] == "pm1" and info["conditional"] is True


def test_public_gan_trained_at_its_own_size_is_resized_for_the_attacks(env):
    """arch.image_size: the GAN trains at 64 px on 32 px data; attacks get 32 px images via to_unit."""
    from diffmi_ray.attacks import get_attack
    from diffmi_ray.attacks.base import AttackInputs
    from diffmi_ray.pipeline.stages.train_classifier import load_classifier

    cls, prior, roles = PRIORS["gan_wgangp"]
    cfg = cls.model_validate({"arch": {**prior["arch"], "image_size": 64}, "train": TINY_TRAIN}).model_dump(mode="json")
    inst = _inst("train_prior", "big0", {"kind": "gan_wgangp", "prior": cfg, "image_size": SIZE, "channels": CH,
                                          "seed": 0}, {"split": env["split"]})
    run_quiet(inst, env["store"])
    path = env["store"].local_path("train_prior", "big0")
    G, D, meta = gan_wgangp.load(path)
    assert (meta["image_size"], meta["output_size"]) == (64, SIZE)
    assert isinstance(G, gan_wgangp.ResizedGenerator) and G.image_size == SIZE
    z = torch.randn(2, G.z_dim)
    raw = G(z)
    assert raw.shape[-1] == 64 and D(raw).shape[0] == 2  # D judges the native 64 px images
    assert G.to_unit(raw).shape == (2, CH, SIZE, SIZE)
    T = load_classifier(env["store"].local_path("train_classifier", "target0"), "cpu")
    inputs = AttackInputs(target=T, num_classes=3, image_shape=(CH, SIZE, SIZE), generator_dir=path,
                          generator_config={}, log=lambda s: None)
    out = get_attack("gmi")({"iterations": 2, "restarts": 1, "batch_size": 2}, inputs).invert(torch.tensor([0, 1]), 0)
    assert out.images.shape == (2, CH, SIZE, SIZE)


def test_only_the_public_gan_may_change_its_size():
    from diffmi_ray.config.checks import check_point
    from diffmi_ray.config.experiment import ExperimentConfig, ProtocolConfig

    protocol = ProtocolConfig.model_validate({"classes": 3, "images_per_class": 1, "eval": {"model": "small_resnet"}})
    base = {"data": {"private": {"dataset": "mnist5k", "classes": [0, 1, 2]},
                     "public": {"dataset": "mnist5k", "classes": [5, 6, 7]}, "image_size": 32, "channels": 1},
            "target": {"model": "small_cnn"}}
    ok = check_point(ExperimentConfig.model_validate({**base, "method": "ppa", "ppa": {"prior": {"arch": {"image_size": 64}}}}),
                     protocol)
    assert not [p for p in ok if "arch" in p[0]], ok
    bad = check_point(ExperimentConfig.model_validate({**base, "method": "kedmi",
                                                       "kedmi": {"prior": {"arch": {"image_size": 64}}}}), protocol)
    assert ("kedmi.prior.arch.image_size" in [p[0] for p in bad]), bad
