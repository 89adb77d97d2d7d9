"""Metric suite: numbers pinned by hand, parity with piq / lpips / pytorch-fid, missing-weights paths.

STAND-INS: several tests replace pretrained networks (Inception, LPIPS backbones) by stand-ins —
an identity feature map, or torchvision AlexNet with *random* weights saved under the official file
name in a temporary folder. They exercise code paths only; the numbers they produce are not FID or
LPIPS and never leave the test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import piq
import pytest
import torch
from torch import nn

from diffmi_ray.config.evaluation import ALL_METRICS, EvaluationConfig
from diffmi_ray.metrics import (EvaluationResult, available_feature_extractors, evaluate_reconstructions, prdc,
                                save_image_grid, same_class_pairs)
from diffmi_ray.metrics.classification import (accuracy_metrics, knn_metrics, nearest_private_sqdist,
                                               repeat_index)
from diffmi_ray.metrics.distribution import frechet_distance
from diffmi_ray.metrics.iqa import IQA_SPECS, pairwise_iqa, prepare_images
from diffmi_ray.metrics.pairs import best_over_pairs

torch.set_num_threads(1)


def quiet(*a, **k):
    pass


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty hub cache and weights_dir, downloads off: every pretrained network is unavailable."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    wdir = tmp_path / "weights"
    wdir.mkdir()
    return dict(weights_dir=str(wdir), allow_download=False)


class MeanE(nn.Module):
    """Hand-made evaluation classifier on constant images: feature (m, 2m) with m the image mean;
    2 classes, predicts class 1 iff m > 0.5."""

    def features(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, 2 * m], dim=1)

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=1)


class TinyE(nn.Module):
    """A small random classifier with ``features_and_logits`` (the repo's Classifier contract)."""

    def __init__(self, channels=3, k=5):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, 8))
        self.head = nn.Linear(8, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))

    def features_and_logits(self, x):
        f = self.features(x)
        return f, self.head(f)


def const(values, c=1, s=4):
    """(len(values), c, s, s) images of constant value."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, c, s, s).contiguous()


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------

def test_config_defaults_and_strictness():
    cfg = EvaluationConfig()
    assert cfg.metrics == list(ALL_METRICS) and cfg.pairing == "best" and cfg.prdc_k == 3
    assert cfg.fid_dims == 2048 and cfg.weights_dir is None and cfg.knn_features == "evalnet"
    assert cfg.pair_batch("vsi") == cfg.pair_batch_sizes["vsi"] and cfg.pair_batch("mdsi") == cfg.pair_batch_size
    for bad in ({"nope": 1}, {"metrics": ["acc", "bogus"]}, {"metrics": ["acc", "acc"]},
                {"pairing": "worst"}, {"pair_batch_sizes": {"acc": 3}}):
        with pytest.raises(Exception):
            EvaluationConfig(**bad)
    for name, f in EvaluationConfig.model_fields.items():
        assert f.description, f"field {name} has no description"


# ----------------------------------------------------------------------------------------------
# pairs, repeats, accuracy, KNN (hand numbers)
# ----------------------------------------------------------------------------------------------

def test_same_class_pairs_and_best_reduction():
    labels = torch.tensor([2, 0, 2, 5])
    plabels = torch.tensor([0, 2, 0, 2, 2])
    ri, pj = same_class_pairs(labels, plabels)
    assert ri.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert pj.tolist() == [1, 3, 4, 0, 2, 1, 3, 4]
    score = torch.tensor([10., 30., 20., 5., 1., 7., 8., 9.])
    lookup = {(int(r), int(p)): float(s) for r, p, s in zip(ri, pj, score)}
    fn = lambda r, p: torch.tensor([lookup[(int(a), int(b))] for a, b in zip(r, p)])  # noqa: E731
    for chunk in (1, 2, 3, 100):  # chunk boundaries inside one reconstruction's pairs
        mx = best_over_pairs(fn, ri, pj, 4, "max", chunk)
        mn = best_over_pairs(fn, ri, pj, 4, "min", chunk)
        assert mx[:3].tolist() == [30., 5., 9.] and mn[:3].tolist() == [10., 1., 7.]
        assert math.isnan(mx[3]) and math.isnan(mn[3])  # class 5 has no private image


def test_repeat_index():
    assert repeat_index(torch.tensor([3, 1, 3, 1, 3, 7])).tolist() == [0, 0, 1, 1, 2, 0]


def test_accuracy_pinned_by_hand():
    # 2 classes x 3 repeats, 6 logits. Order: [c0 r0, c1 r0, c0 r1, c1 r1, c0 r2, c1 r2].
    # c0: top1 [1,0,0], top5 [1,1,0];  c1: top1 [0,0,1], top5 [1,1,1].
    def logits(target, rank):  # target at 0-based rank `rank` among 6 logits
        order = [c for c in range(6) if c != target]
        order.insert(rank, target)
        z = torch.zeros(6)
        z[torch.tensor(order)] = torch.arange(6, 0, -1, dtype=torch.float32)
        return z

    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    ranks = [0, 1, 1, 1, 5, 0]  # rank 0: top1; 1: top5 not top1; 5: neither
    z = torch.stack([logits(int(t), r) for t, r in zip(labels, ranks)])
    per_class, agg = accuracy_metrics(z, labels, ddof=1)
    s = math.sqrt(1 / 3)  # sample std of [1, 0, 0] and of [1, 1, 0]
    assert per_class[0] == pytest.approx({"acc1": 1 / 3, "acc5": 2 / 3, "acc1_std": s, "acc5_std": s})
    assert per_class[1] == pytest.approx({"acc1": 1 / 3, "acc5": 1.0, "acc1_std": s, "acc5_std": 0.0})
    # per-repeat acc1 [0.5, 0, 0.5] and acc5 [1, 1, 0.5]: sample std sqrt(1/12) each
    assert agg == pytest.approx({"acc1": 1 / 3, "acc5": 5 / 6, "acc1_std": math.sqrt(1 / 12),
                                 "acc5_std": math.sqrt(1 / 12)})
    _, agg0 = accuracy_metrics(z, labels, ddof=0)
    assert agg0["acc1_std"] == pytest.approx(math.sqrt(1 / 18))
    # top-5 with fewer than 5 classes is top-K (always correct)
    _, agg3 = accuracy_metrics(z[:, :3].clone().fill_(0.0) + torch.tensor([3.0, 2.0, 1.0]),
                               torch.tensor([0, 1, 0, 1, 2, 2]), ddof=1)
    assert agg3["acc5"] == 1.0 and agg3["acc1"] == pytest.approx(2 / 6)


def test_knn_dist_pinned_by_hand():
    # features (m, 2m): squared distance 5 (m - u)^2. E predicts class 1 iff m > 0.5.
    recon = const([0.1, 0.3, 0.7, 0.9, 0.2])
    labels = torch.tensor([0, 0, 0, 1, 1])           # 0.7 (class 0) and 0.2 (class 1) misclassified
    private = const([0.0, 0.25, 0.8, 1.0])
    plabels = torch.tensor([0, 0, 1, 1])
    cfg = EvaluationConfig(metrics=["acc", "knn"])
    r = evaluate_reconstructions(recon, labels, private, plabels, MeanE(), cfg, log=quiet)
    v = r.values()
    # nearest same-class: 0.1->0.0: 0.05; 0.3->0.25: 0.0125; 0.9->0.8|1.0: 0.05
    assert v["knn_dist"] == pytest.approx((0.05 + 0.0125 + 0.05) / 3)
    assert v["knn_count"] == 3 and v["acc1"] == pytest.approx(0.6)
    pc = r.per_class.set_index(["class", "metric"])["value"]
    assert pc[(0, "knn_dist")] == pytest.approx(0.03125) and pc[(0, "knn_count")] == 2
    assert pc[(1, "knn_dist")] == pytest.approx(0.05) and pc[(1, "knn_count")] == 1
    # all reconstructions: + 0.7->0.25: 1.0125, 0.2->0.8: 1.8
    r_all = evaluate_reconstructions(recon, labels, private, plabels, MeanE(),
                                     EvaluationConfig(metrics=["knn"], knn_correct_only=False), log=quiet)
    assert r_all.values()["knn_dist"] == pytest.approx(2.925 / 5) and r_all.values()["knn_count"] == 5


def test_knn_functions_and_orphan_class():
    f = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    g = torch.tensor([[0.0, 1.0], [3.0, 1.0], [1.0, 2.0]])
    d = nearest_private_sqdist(f, torch.tensor([0, 1, 9]), g, torch.tensor([0, 1, 1]))
    assert d[:2].tolist() == [1.0, 1.0] and math.isnan(d[2])
    _, agg = knn_metrics(d, torch.tensor([0, 1, 9]), None)
    assert agg == {"knn_dist": 1.0, "knn_count": 2.0}


# ----------------------------------------------------------------------------------------------
# pairing rule and piq parity
# ----------------------------------------------------------------------------------------------

def test_pairing_rule_best_vs_official():
    # one reconstruction (0.5) vs private 0.4 and 0.2 (RGB, 16x16)
    recon = const([0.5], c=3, s=16)
    private = const([0.4, 0.2], c=3, s=16) + torch.linspace(0, 0.05, 16).view(1, 1, 1, 16)
    labels, plabels = torch.tensor([0]), torch.tensor([0, 0])
    direct = {m: [float(getattr(piq, m)(recon, private[j:j + 1], data_range=1.0)) for j in range(2)]
              for m in ("psnr", "mdsi")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = evaluate_reconstructions(recon, labels, private, plabels, MeanE(),
                                        EvaluationConfig(metrics=["psnr", "mdsi"]), log=quiet).values()
        off = evaluate_reconstructions(recon, labels, private, plabels, MeanE(),
                                       EvaluationConfig(metrics=["psnr", "mdsi"], pairing="official"),
                                       log=quiet).values()
    assert direct["mdsi"][0] != pytest.approx(direct["mdsi"][1])
    assert best["psnr"] == pytest.approx(max(direct["psnr"])) == off["psnr"]
    # (piq's float32 results move by ~1e-5 relative with the batch they are computed in)
    assert best["mdsi"] == pytest.approx(min(direct["mdsi"]), rel=1e-4)   # lower is better: keep the min
    assert off["mdsi"] == pytest.approx(max(direct["mdsi"]), rel=1e-4)    # official rule: max for everything
    # PSNR by hand (constant images 0.5 vs 0.4 -> MSE = 0.01 -> 20 dB), piq adds 1e-8 to MSE
    p = float(piq.psnr(recon, const([0.4], c=3, s=16), data_range=1.0))
    assert p == pytest.approx(20.0, abs=1e-4)


@pytest.mark.parametrize("channels", [3, 1])
def test_iqa_agrees_with_piq_on_one_pair(channels):
    g = torch.Generator().manual_seed(channels)
    x = torch.rand(1, channels, 48, 48, generator=g)
    y = (x * 0.7 + 0.3 * torch.rand(1, channels, 48, 48, generator=g)).clamp(0, 1)
    ri, pj = torch.tensor([0]), torch.tensor([0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, spec in IQA_SPECS.items():
            xs, ys = prepare_images(x, spec.min_side, spec.rgb), prepare_images(y, spec.min_side, spec.rgb)
            ours = float(pairwise_iqa(name, xs, ys, ri, pj)[0])
            kw = {"chromatic": channels == 3} if name == "fsim" else {}
            ref = float(getattr(piq, name)(x, y, data_range=1.0, **kw))  # piq repeats gray itself for vsi/mdsi
            assert ours == pytest.approx(ref, rel=1e-5, abs=1e-6), name  # same single pair: same batch


@pytest.mark.parametrize("memo", [True, False])
def test_batched_iqa_equals_per_pair_loop(memo):
    """The batched suite equals a naive loop over pairs calling piq once per pair (chunks split pairs),
    with and without the per-image memo of VSI/FSIM/SR-SIM."""
    g = torch.Generator().manual_seed(1)
    recon = torch.rand(4, 3, 40, 40, generator=g)
    labels = torch.tensor([0, 1, 0, 1])
    private = torch.rand(5, 3, 40, 40, generator=g)
    plabels = torch.tensor([1, 0, 1, 0, 1])
    names = ["psnr", "ssim", "haarpsi", "srsim", "dss", "mdsi", "fsim", "vsi"]
    cfg = EvaluationConfig(metrics=names, pair_batch_size=4, pair_batch_sizes={"fsim": 3, "ssim": 5},
                           iqa_memo=memo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evaluate_reconstructions(recon, labels, private, plabels, MeanE(), cfg, log=quiet)
    pc = res.per_class.set_index(["class", "metric"])["value"]
    for name in names:
        per_recon = []
        for i in range(4):
            vals = [float(getattr(piq, name)(recon[i:i + 1], private[j:j + 1], data_range=1.0))
                    for j in range(5) if plabels[j] == labels[i]]
            per_recon.append(min(vals) if name == "mdsi" else max(vals))
        # float32 piq results move by ~1e-5 relative with the batch they are computed in
        assert res.values()[name] == pytest.approx(np.mean(per_recon), rel=1e-4), name
        assert pc[(0, name)] == pytest.approx((per_recon[0] + per_recon[2]) / 2, rel=1e-4), name


def test_per_image_memo_counts_and_lru(monkeypatch):
    import sys
    import types

    from diffmi_ray.metrics.memo import PerImageMemo, PerImageStep

    calls = []
    mod = types.ModuleType("standin_piq_module")  # STAND-IN module with a per-image step

    def step(x, scale=1.0):
        calls.append(x.shape[0])
        return x.flatten(1).sum(1) * scale

    mod.step = step
    monkeypatch.setitem(sys.modules, "standin_piq_module", mod)
    x = torch.arange(12.0).view(4, 3)
    with PerImageMemo(PerImageStep("standin_piq_module", "step")) as memo:
        a = mod.step(x[[0, 1, 0]], scale=2.0)
        b = mod.step(x[[1, 2]], scale=2.0)
        c = mod.step(x[[1]], scale=3.0)              # other arguments: another key
    assert a.tolist() == [6.0, 24.0, 6.0] and b.tolist() == [24.0, 42.0] and c.tolist() == [36.0]
    assert calls == [2, 1, 1] and memo.hits == 2 and memo.misses == 4  # the duplicate is computed once
    assert mod.step is step                              # un-patched after the block
    with PerImageMemo(PerImageStep("standin_piq_module", "step", one_at_a_time=True), max_bytes=8) as memo:
        calls.clear()
        mod.step(x)                                      # one call per image; LRU keeps 2 rows of 4 bytes
        assert calls == [1, 1, 1, 1] and len(memo.cache) == 2


def test_small_gray_images_are_upsampled_and_noted():
    g = torch.Generator().manual_seed(2)
    recon, private = torch.rand(2, 1, 12, 12, generator=g), torch.rand(2, 1, 12, 12, generator=g)
    lab = torch.tensor([0, 1])
    res = evaluate_reconstructions(recon, lab, private, lab, MeanE(),
                                   EvaluationConfig(metrics=["srsim", "haarpsi", "psnr"]), log=quiet)
    assert set(res.values()) == {"srsim", "haarpsi", "psnr"}
    assert "40" in res.notes["srsim"] and "16" in res.notes["haarpsi"] and "psnr" not in res.notes
    assert all(np.isfinite(list(res.values().values())))


# ----------------------------------------------------------------------------------------------
# FID / PRDC: pinned math, stand-in extractor, missing weights
# ----------------------------------------------------------------------------------------------

def test_frechet_distance_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64)
    assert frechet_distance(a + shift, a) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    # two Gaussians with diagonal covariances: ||mu||^2 + sum (s1 - s2)^2 over std devs
    b = a * 2.0
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    cov = torch.cov(a.T)
    expected += float(torch.trace(cov + 4 * cov - 2 * 2 * cov))
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], a)


def test_prdc_pinned_by_hand_and_brute_force():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0], [2.2]])
    # k=1: radii real all 1; precision: 0.5 and 2.2 inside -> 2/3; density (2 + 0 + 2)/3;
    # recall / coverage 1 (every real within reach)
    assert prdc(real, fake, k=1) == pytest.approx({"precision": 2 / 3, "recall": 1.0, "density": 4 / 3,
                                                   "coverage": 1.0})
    g = torch.Generator().manual_seed(3)
    r, f, k = torch.randn(30, 5, generator=g), torch.randn(20, 5, generator=g) + 0.5, 3

    def radii(x):
        return [sorted(float((x[i] - x[j]).norm()) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    rr, rf = radii(r), radii(f)
    d = [[float((r[i] - f[j]).norm()) for j in range(len(f))] for i in range(len(r))]
    ref = {"precision": np.mean([any(d[i][j] < rr[i] for i in range(30)) for j in range(20)]),
           "recall": np.mean([any(d[i][j] < rf[j] for j in range(20)) for i in range(30)]),
           "density": np.mean([sum(d[i][j] < rr[i] for i in range(30)) for j in range(20)]) / k,
           "coverage": np.mean([min(d[i]) < rr[i] for i in range(30)])}
    assert prdc(r, f, k) == pytest.approx(ref)


def STANDIN_identity_features(x):
    """STAND-IN for Inception (tests only): the flattened pixels."""
    return x.flatten(1)


def test_fid_and_prdc_with_standin_extractor():
    g = torch.Generator().manual_seed(4)
    private = torch.rand(40, 1, 2, 2, generator=g) * 0.8
    plabels = torch.arange(4).repeat(10)
    cfg = EvaluationConfig(metrics=["fid", "prdc"], prdc_scope="global", allow_download=False)
    same = evaluate_reconstructions(private.clone(), plabels, private, plabels, MeanE(), cfg, log=quiet,
                                    extractors={"inception": STANDIN_identity_features})
    v = same.values()
    assert v["fid"] == pytest.approx(0.0, abs=1e-6)
    assert v["precision"] == 1.0 and v["recall"] == 1.0 and v["coverage"] == 1.0 and not same.missing
    shifted = evaluate_reconstructions(private + 0.1, plabels, private, plabels, MeanE(), cfg, log=quiet,
                                       extractors={"inception": STANDIN_identity_features})
    assert shifted.values()["fid"] == pytest.approx(4 * 0.1 ** 2, rel=1e-4)  # ||mu shift||^2, same covariance
    # per-class PRDC (default scope): 10 reconstructions and 10 private images per class
    pcr = evaluate_reconstructions(private.clone(), plabels, private, plabels, MeanE(),
                                   EvaluationConfig(metrics=["prdc"]), log=quiet,
                                   extractors={"inception": STANDIN_identity_features})
    assert pcr.values()["precision"] == 1.0
    assert set(pcr.per_class["class"]) == {0, 1, 2, 3}


def test_missing_inception_and_lpips_weights_leave_the_rest_computed(offline):
    logs = []
    g = torch.Generator().manual_seed(5)
    recon, private = torch.rand(6, 3, 16, 16, generator=g), torch.rand(9, 3, 16, 16, generator=g)
    labels, plabels = torch.arange(3).repeat(2), torch.arange(3).repeat(3)
    cfg = EvaluationConfig(metrics=["acc", "knn", "fid", "fid_evalnet", "prdc", "psnr", "lpips_alex", "lpips_vgg"],
                           **offline)
    avail = available_feature_extractors(cfg, log=logs.append)
    assert set(avail) == {"inception", "lpips_alex", "lpips_vgg"} and all(avail.values())
    res = evaluate_reconstructions(recon, labels, private, plabels, TinyE(), cfg, log=logs.append)
    assert set(res.missing) == {"fid", "precision", "recall", "density", "coverage", "lpips_alex", "lpips_vgg"}
    assert "pt_inception-2015-12-05-6726825d.pth" in res.missing["fid"]
    assert "alexnet-owt-7be5be79.pth" in res.missing["lpips_alex"]
    assert "vgg16-397923af.pth" in res.missing["lpips_vgg"]
    assert any("pt_inception-2015-12-05-6726825d.pth" in line and "weights_dir" in line for line in logs)
    v = res.values()
    assert {"acc1", "acc5", "acc1_std", "acc5_std", "knn_dist", "knn_count", "fid_evalnet", "psnr"} <= set(v)
    assert not ({"fid", "lpips_alex", "lpips_vgg", "precision"} & set(v))  # never computed under those names
    assert list(res.missing_frame({"point": "p"}).columns) == ["point", "metric", "reason"]
    # injected stand-ins count as available
    assert available_feature_extractors(cfg, extractors={"inception": STANDIN_identity_features},
                                        log=quiet)["inception"] is None


def test_weights_dir_file_is_found_and_hash_checked(tmp_path, monkeypatch):
    from diffmi_ray.metrics.weights import ALEXNET_WEIGHTS, resolve_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    (tmp_path / ALEXNET_WEIGHTS.filename).write_bytes(b"not the real file")
    cfg = EvaluationConfig(weights_dir=str(tmp_path), allow_download=False)
    path, reason = resolve_weights(ALEXNET_WEIGHTS, cfg, log=quiet)
    assert path is None and "SHA-256" in reason          # a wrong file is refused under the real name
    path, reason = resolve_weights(ALEXNET_WEIGHTS, cfg.model_copy(update={"verify_weights_hash": False}), log=quiet)
    assert reason is None and path == tmp_path / ALEXNET_WEIGHTS.filename


def test_fid_inception_loads_from_local_file_STANDIN_random_weights(tmp_path):
    """pytorch-fid's InceptionV3 built from a local file (STAND-IN: random weights in the FID layout)."""
    from pytorch_fid import inception as pfi

    from diffmi_ray.metrics.features import inception_feature_fn, load_fid_inception
    from diffmi_ray.metrics.weights import INCEPTION_WEIGHTS

    torch.manual_seed(0)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", pfi.FIDInceptionA(192, 32)), ("Mixed_5c", pfi.FIDInceptionA(256, 64)),
                        ("Mixed_5d", pfi.FIDInceptionA(288, 64)), ("Mixed_6b", pfi.FIDInceptionC(768, 128)),
                        ("Mixed_6c", pfi.FIDInceptionC(768, 160)), ("Mixed_6d", pfi.FIDInceptionC(768, 160)),
                        ("Mixed_6e", pfi.FIDInceptionC(768, 192)), ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                        ("Mixed_7c", pfi.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    path = tmp_path / INCEPTION_WEIGHTS.filename
    torch.save(net.state_dict(), path)
    model = load_fid_inception(path, 2048)
    assert isinstance(model, pfi.InceptionV3)
    ref_w = net.Conv2d_1a_3x3.conv.weight
    assert torch.equal(model.blocks[0][0].conv.weight, ref_w)  # the file's weights, not a fresh init
    f = inception_feature_fn(model)(torch.rand(2, 1, 16, 16))
    assert f.shape == (2, 2048)


# ----------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def standin_alexnet_dir(tmp_path):
    """STAND-IN: torchvision AlexNet with RANDOM weights saved under the official file name (tests only)."""
    import torchvision

    from diffmi_ray.metrics.weights import ALEXNET_WEIGHTS

    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / ALEXNET_WEIGHTS.filename)
    return tmp_path


def test_lpips_factorised_equals_lpips_forward_STANDIN_backbone(standin_alexnet_dir, monkeypatch):
    import lpips

    from diffmi_ray.metrics.lpips_metric import load_lpips, pairwise_lpips
    from diffmi_ray.metrics.weights import ALEXNET_WEIGHTS

    monkeypatch.setenv("TORCH_HOME", str(standin_alexnet_dir / "th"))
    model = load_lpips("alex", standin_alexnet_dir / ALEXNET_WEIGHTS.filename)
    # the backbone is exactly the file's (strict load), the heads are the package's
    state = torch.load(standin_alexnet_dir / ALEXNET_WEIGHTS.filename)
    assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").weight, state["features.10.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    assert torch.equal(model.lin0.model[-1].weight, ref_model.lin0.model[-1].weight)

    g = torch.Generator().manual_seed(6)
    recon, private = torch.rand(4, 3, 32, 32, generator=g), torch.rand(6, 3, 32, 32, generator=g)
    labels, plabels = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 0, 1, 1, 1])
    for reduce, pick in (("min", min), ("max", max)):
        ours = pairwise_lpips(model, recon, labels, private, plabels, reduce=reduce, min_side=32,
                              pair_chunk=2, cache_mb=1e-3)  # tiny budget: one class per group
        for i in range(4):
            direct = [float(model(recon[i:i + 1] * 2 - 1, private[j:j + 1] * 2 - 1))
                      for j in range(6) if plabels[j] == labels[i]]
            assert float(ours[i]) == pytest.approx(pick(direct), rel=1e-5, abs=1e-7)

    # through the suite: the stand-in file found in weights_dir (hash check off for a stand-in);
    # gray 20x20 images are repeated to RGB and upsampled to AlexNet's 32-px minimum
    cfg = EvaluationConfig(metrics=["lpips_alex"], weights_dir=str(standin_alexnet_dir), allow_download=False,
                           verify_weights_hash=False)
    gray = torch.rand(2, 1, 20, 20, generator=g)
    res = evaluate_reconstructions(gray, torch.tensor([0, 0]), gray.flip(0), torch.tensor([0, 0]), MeanE(),
                                   cfg, log=quiet)
    assert not res.missing and res.values()["lpips_alex"] == pytest.approx(0.0, abs=1e-6)  # each matches itself
    assert "32" in res.notes["lpips_alex"]
    # with the hash check on, the random stand-in is refused under the LPIPS name
    res = evaluate_reconstructions(gray, torch.tensor([0, 0]), gray, torch.tensor([0, 0]), MeanE(),
                                   cfg.model_copy(update={"verify_weights_hash": True}), log=quiet)
    assert "lpips_alex" in res.missing and "lpips_alex" not in res.values()


def test_lpips_real_weights_if_cached():
    """Real LPIPS-Alex vs lpips called directly (runs only where the AlexNet weights are cached)."""
    from diffmi_ray.metrics.weights import ALEXNET_WEIGHTS, hub_checkpoint_dir

    if not (hub_checkpoint_dir() / ALEXNET_WEIGHTS.filename).is_file():
        pytest.skip("torchvision AlexNet weights not in the hub cache (offline machine)")
    import lpips

    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    res = evaluate_reconstructions(x, torch.tensor([0]), y, torch.tensor([0]), MeanE(),
                                   EvaluationConfig(metrics=["lpips_alex"], allow_download=False), log=quiet)
    ref = float(lpips.LPIPS(net="alex", verbose=False)(x * 2 - 1, y * 2 - 1))
    assert res.values()["lpips_alex"] == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# output: tidy frame, CSV, image grid
# ----------------------------------------------------------------------------------------------

def test_tidy_frame_columns_and_csv(tmp_path):
    g = torch.Generator().manual_seed(8)
    recon, private = torch.rand(4, 3, 16, 16, generator=g), torch.rand(6, 3, 16, 16, generator=g)
    labels, plabels = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
    res = evaluate_reconstructions(recon, labels, private, plabels, TinyE(k=3),
                                   EvaluationConfig(metrics=["acc", "psnr", "fid_evalnet"]), log=quiet)
    assert isinstance(res, EvaluationResult)
    assert list(res.per_class.columns) == ["class", "metric", "value"]
    assert list(res.aggregate.columns) == ["metric", "value"]
    meta = {"method": "diff_mi", "public": "ffhq", "private": "celeba", "target": "vgg16", "eval": "facenet",
            "diff_mi.attack.k": 2}
    df = res.to_frame(meta)
    assert list(df.columns) == [*meta, "class", "metric", "value"]
    agg = df[df["class"] == "all"]
    assert set(agg["metric"]) == {"acc1", "acc5", "acc1_std", "acc5_std", "psnr", "fid_evalnet"}
    per = df[df["class"] != "all"]
    assert set(per["class"]) == {0, 1} and all(isinstance(c, int) for c in per["class"])
    assert "fid_evalnet" not in set(per["metric"])  # set-level metric: aggregate only
    assert (df["method"] == "diff_mi").all() and df["value"].dtype == float
    path = res.write_csv(tmp_path / "out" / "metrics.csv", meta)
    back = pd.read_csv(path)
    assert len(back) == len(df) and list(back.columns) == list(df.columns)
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]  # no temp file left
    with pytest.raises(ValueError):
        res.to_frame({"metric": "x"})


def test_save_image_grid(tmp_path):
    from PIL import Image

    recon = torch.rand(6, 1, 8, 8)
    labels = torch.tensor([2, 0, 1, 2, 0, 1])
    private = torch.rand(5, 1, 8, 8)
    plabels = torch.tensor([0, 0, 0, 1, 2])
    path = save_image_grid(tmp_path / "g" / "grid.png", recon, labels, private, plabels, n_private_per_class=2)
    img = Image.open(path)
    # 3 classes -> 3 columns; rows: 2 private + 2 reconstructions; 8 px tiles, 2 px padding
    assert img.size == (3 * 10 + 2, 4 * 10 + 2) and img.mode == "RGB"
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]
    arr = np.asarray(img)
    # top-left tile = first private image of class 0
    expected = (private[0, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(arr[2:10, 2:10, 0], expected)


def test_all_metric_groups_offline_smoke(offline):
    """Every group on a tiny RGB set, offline: computed or missing with a reason, nothing else."""
    g = torch.Generator().manual_seed(9)
    recon, private = torch.rand(4, 3, 16, 16, generator=g), torch.rand(8, 3, 16, 16, generator=g)
    labels, plabels = torch.tensor([0, 1, 0, 1]), torch.arange(2).repeat(4)
    cfg = EvaluationConfig(metrics=[m for m in ALL_METRICS if m != "vsi"], **offline)
    res = evaluate_reconstructions(recon, labels, private, plabels, TinyE(), cfg, log=quiet)
    from diffmi_ray.metrics.suite import GROUP_ROWS

    expected = {r for grp in cfg.metrics for r in GROUP_ROWS[grp]}
    assert set(res.values()) | set(res.missing) == expected
    assert not set(res.values()) & set(res.missing)
