"""The paper's metric suite (PROTOCOL.md §5) over one grid point's reconstructions.

:func:`evaluate_reconstructions` is pure: tensors and models in, an :class:`EvaluationResult` out; no
files are read or written except pretrained weights (see :mod:`.weights`). Features are computed once
per image (E, Inception, LPIPS backbones); pairwise metrics score every (reconstruction, private image
of the same class) pair in chunks and keep the best match per reconstruction.

Metric rows (``metric`` column) and units:

- acc1, acc5: fraction in [0, 1] of reconstructions E puts the target class in its top-1 / top-5;
  acc1_std, acc5_std: std over the M repeats (per class: over the class's M images; aggregate: over
  the M per-repeat accuracies, ``cfg.std_ddof``).
- knn_dist: squared L2 in E's feature space (``cfg.knn_features``) to the nearest private image of
  the same class, averaged over reconstructions E classifies correctly; knn_count: how many.
- fid: pytorch-fid FID (Inception pool3) between all reconstructions and all private images given;
  fid_evalnet: the same Fréchet distance over E's features (a different, separately named metric).
- precision, recall, density, coverage: PRDC (k = ``cfg.prdc_k``) over ``cfg.prdc_features``.
- psnr (dB), ssim, fsim, vsi, haarpsi, srsim, dss, mdsi (piq), lpips_alex, lpips_vgg: best match
  over the private images of the class (``cfg.pairing``), averaged.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
import torch
from torch import Tensor, nn

from diffmi_ray.config.evaluation import EvaluationConfig
from diffmi_ray.metrics import classification as C
from diffmi_ray.metrics.distribution import PRDC_NAMES, frechet_distance, prdc
from diffmi_ray.metrics.features import (batched_features, classifier_outputs, inception_feature_fn,
                                         load_fid_inception, quantize_8bit)
from diffmi_ray.metrics.iqa import (IQA_NAMES, IQA_SPECS, pair_reduce, pairwise_iqa, preparation_key, prepare_images,
                                   resize_note)
from diffmi_ray.metrics.lpips_metric import LPIPS_NAMES, LPIPS_NETS, load_lpips, pairwise_lpips
from diffmi_ray.metrics.pairs import same_class_pairs
from diffmi_ray.metrics.weights import resolve_extractors

#: Row names each metric group yields, in report order.
GROUP_ROWS: dict[str, tuple[str, ...]] = {
    "acc": ("acc1", "acc5", "acc1_std", "acc5_std"),
    "knn": ("knn_dist", "knn_count"),
    "fid": ("fid",),
    "fid_evalnet": ("fid_evalnet",),
    "prdc": PRDC_NAMES,
    **{n: (n,) for n in IQA_NAMES},
    **{n: (n,) for n in LPIPS_NAMES},
}
METRIC_ORDER: tuple[str, ...] = tuple(r for rows in GROUP_ROWS.values() for r in rows)
LOWER_IS_BETTER = frozenset({"fid", "fid_evalnet", "knn_dist", "mdsi", "lpips_alex", "lpips_vgg"})


def _order(metric: str) -> int:
    return METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)


@dataclass
class EvaluationResult:
    """Metrics of one grid point.

    per_class: tidy rows (class int, metric str, value float) — per-class means.
    aggregate: tidy rows (metric str, value float) over all reconstructions.
    missing: metric row name -> reason it was not computed (e.g. weights unavailable).
    notes: metric row name -> caveat about how it was computed (e.g. images upsampled).
    timings: metric group -> wall seconds.
    """

    per_class: pd.DataFrame
    aggregate: pd.DataFrame
    missing: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """Aggregate metric -> value."""
        return {str(m): float(v) for m, v in zip(self.aggregate["metric"], self.aggregate["value"])}

    def to_frame(self, meta: Mapping[str, object] | None = None) -> pd.DataFrame:
        """The tidy long table: meta columns (method, datasets, target, eval, axes ...), then
        ``class`` (int, or "all" for aggregate rows), ``metric``, ``value``. Aggregates come first."""
        meta = dict(meta or {})
        clash = {"class", "metric", "value"} & set(meta)
        if clash:
            raise ValueError(f"meta keys {sorted(clash)} clash with the table's own columns")
        agg = self.aggregate.assign(**{"class": "all"})[["class", "metric", "value"]]
        per = self.per_class[["class", "metric", "value"]]
        body = pd.concat([agg, per], ignore_index=True)
        body["class"] = pd.Series([c if c == "all" else int(c) for c in body["class"]], dtype=object)
        body["value"] = body["value"].astype(float)
        for i, (k, v) in enumerate(meta.items()):
            body.insert(i, k, [v] * len(body))
        return body

    def missing_frame(self, meta: Mapping[str, object] | None = None) -> pd.DataFrame:
        """Rows (meta..., metric, reason) for every missing metric."""
        df = pd.DataFrame({"metric": list(self.missing), "reason": list(self.missing.values())})
        for i, (k, v) in enumerate(dict(meta or {}).items()):
            df.insert(i, k, [v] * len(df))
        return df

    def write_csv(self, path: str | Path, meta: Mapping[str, object] | None = None) -> Path:
        """Write :meth:`to_frame` as CSV atomically (temp file in the same folder + os.replace)."""
        return write_csv_atomic(self.to_frame(meta), path)


def write_atomic(path: str | Path, write: Callable[[object], None], *, mode: str = "w", suffix: str = ".tmp") -> Path:
    """Call ``write(file)`` on a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``
    (readers never see half a file; the temp file is removed on any error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_csv_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    """``df.to_csv(path, index=False)`` via a temp file and ``os.replace`` (readers never see half a file)."""
    return write_atomic(path, lambda f: df.to_csv(f, index=False))


def _check_inputs(images: Tensor, labels: Tensor, private_images: Tensor, private_labels: Tensor) -> None:
    if images.ndim != 4 or private_images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got {tuple(images.shape)} and {tuple(private_images.shape)}")
    if images.shape[1:] != private_images.shape[1:]:
        raise ValueError(f"reconstructions {tuple(images.shape[1:])} and private images "
                         f"{tuple(private_images.shape[1:])} must have the same (C, H, W)")
    if labels.shape != (images.shape[0],) or private_labels.shape != (private_images.shape[0],):
        raise ValueError("labels must be (N,) and private_labels (P,) matching the image counts")
    if images.shape[0] == 0 or private_images.shape[0] == 0:
        raise ValueError("need at least one reconstruction and one private image")
    if not images.is_floating_point() or not private_images.is_floating_point():
        raise ValueError("images must be float tensors in [0, 1]")


def _clamp01(x: Tensor, what: str, log: Callable[[str], None]) -> Tensor:
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        log(f"[metrics] {what} range [{lo:.3f}, {hi:.3f}] is outside [0, 1]; clamping")
    return x.float().clamp(0.0, 1.0)


def _per_class_mean(values: Tensor, labels: Tensor) -> dict[int, float]:
    """class -> nan-mean of per-reconstruction values (N,)."""
    out = {}
    for c in torch.unique(labels).tolist():
        v = values[labels == c]
        v = v[~torch.isnan(v)]
        out[int(c)] = float(v.mean()) if v.numel() else float("nan")
    return out


def _nanmean(values: Tensor) -> float:
    v = values[~torch.isnan(values)]
    return float(v.mean()) if v.numel() else float("nan")


def evaluate_reconstructions(images: Tensor, labels: Tensor, private_images: Tensor, private_labels: Tensor,
                             eval_model: nn.Module, cfg: EvaluationConfig | None = None, *,
                             device: torch.device | str = "cpu", log: Callable[[str], None] = print,
                             extractors: Mapping[str, object] | None = None) -> EvaluationResult:
    """Every configured metric of reconstructions against the private images of the attacked classes.

    Args:
        images: (N, C, H, W) float in [0, 1], the reconstructions; the r-th image of a class (in this
            order) is its repeat r.
        labels: (N,) long, target class of each reconstruction.
        private_images: (P, C, H, W) float in [0, 1], private images of the attacked classes only.
        private_labels: (P,) long.
        eval_model: evaluation classifier E: ``forward(x) -> logits (B, K)``, ``features(x) -> (B, D)``
            on [0, 1] images (``features_and_logits`` is used when present). Put in eval mode for the
            call and moved to the device (its train/eval mode is restored, its device is not).
        cfg: metric options (defaults: the paper's protocol).
        device: where to compute, unless ``cfg.device`` is set.
        log: line logger.
        extractors: TEST STAND-INS ONLY, replacing a pretrained network by name: 'inception' ->
            callable images [0,1] (B, C, H, W) -> (B, D); 'lpips_alex' / 'lpips_vgg' -> an
            ``lpips.LPIPS`` module. Production code never passes this.

    Returns:
        :class:`EvaluationResult` with per-class and aggregate rows, missing metrics and notes.
    """
    cfg = cfg or EvaluationConfig()
    dev = torch.device(cfg.device or device)
    extractors = dict(extractors or {})
    _check_inputs(images, labels, private_images, private_labels)
    images = _clamp01(images.detach().cpu(), "reconstructions", log)
    private_images = _clamp01(private_images.detach().cpu(), "private images", log)
    labels = labels.detach().long().cpu()
    private_labels = private_labels.detach().long().cpu()
    groups = list(cfg.metrics)
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]

    per_class: dict[tuple[int, str], float] = {}
    agg: dict[str, float] = {}
    missing: dict[str, str] = {}
    notes: dict[str, str] = {}
    timings: dict[str, float] = {}

    orphans = sorted(set(torch.unique(labels).tolist()) - set(torch.unique(private_labels).tolist()))
    if orphans:
        log(f"[metrics] classes {orphans[:10]}{'...' if len(orphans) > 10 else ''} have no private image: "
            "their pairwise metrics and KNN Dist are NaN and left out of the means")
    log(f"[metrics] {n} reconstructions of {len(torch.unique(labels))} classes vs {private_images.shape[0]} "
        f"private images ({images.shape[1]}x{h}x{w}) on {dev}: {', '.join(groups)}")

    def put(rows_per_class: Mapping[int, Mapping[str, float]] | None, rows_agg: Mapping[str, float]) -> None:
        for c, d in (rows_per_class or {}).items():
            for m, v in d.items():
                per_class[(c, m)] = float(v)
        agg.update({m: float(v) for m, v in rows_agg.items()})

    def mark_missing(group: str, reason: str, rows: tuple[str, ...] | None = None) -> None:
        for r in rows or GROUP_ROWS[group]:
            missing[r] = reason

    # -- pretrained extractors: one availability check before any compute ---------------------------
    resolved = resolve_extractors(cfg, extractors, log=log)

    # -- E: logits and features, once per image ---------------------------------------------------------
    need_e_recon = any(g in groups for g in ("acc", "fid_evalnet")) or (
        "knn" in groups) or ("prdc" in groups and cfg.prdc_features == "evalnet")
    need_e_private = "fid_evalnet" in groups or ("knn" in groups and cfg.knn_features == "evalnet") or (
        "prdc" in groups and cfg.prdc_features == "evalnet")
    e_feats = e_logits = e_pfeats = None
    was_training = eval_model.training
    if need_e_recon or need_e_private:
        t0 = time.perf_counter()
        eval_model.eval().to(dev)
        try:
            e_feats, e_logits = classifier_outputs(eval_model, images, cfg.eval_batch_size, dev)
            if need_e_private:
                e_pfeats, _ = classifier_outputs(eval_model, private_images, cfg.eval_batch_size, dev)
        finally:
            eval_model.train(was_training)
        timings["evalnet_features"] = time.perf_counter() - t0

    # -- Inception features, once per image ----------------------------------------------------------------
    inc_feats = inc_pfeats = None
    if "inception" in resolved:
        path, reason = resolved["inception"]
        if reason is None:
            t0 = time.perf_counter()
            if "inception" in extractors:
                fn = extractors["inception"]
            else:
                model = load_fid_inception(path, cfg.fid_dims).to(dev)
                fn = inception_feature_fn(model)
            prep = quantize_8bit if cfg.fid_quantize else (lambda x: x)
            inc_feats = batched_features(fn, prep(images), cfg.feature_batch_size, dev)
            inc_pfeats = batched_features(fn, prep(private_images), cfg.feature_batch_size, dev)
            timings["inception_features"] = time.perf_counter() - t0

    def inception_reason() -> str:
        return resolved.get("inception", (None, "Inception not resolved"))[1] or ""

    # -- accuracy ----------------------------------------------------------------------------------------
    correct = C.topk_correct(e_logits, labels, 1) if e_logits is not None else None
    if "acc" in groups:
        t0 = time.perf_counter()
        put(*C.accuracy_metrics(e_logits, labels, cfg.std_ddof))
        timings["acc"] = time.perf_counter() - t0

    # -- KNN Dist ---------------------------------------------------------------------------------------
    if "knn" in groups:
        t0 = time.perf_counter()
        if cfg.knn_features == "evalnet":
            fr, fp = e_feats, e_pfeats
        else:
            fr, fp = inc_feats, inc_pfeats
        if fr is None:
            mark_missing("knn", f"KNN Dist over Inception features: {inception_reason()}")
        else:
            d = C.nearest_private_sqdist(fr, labels, fp, private_labels)
            put(*C.knn_metrics(d, labels, correct if cfg.knn_correct_only else None))
        timings["knn"] = time.perf_counter() - t0

    # -- FID and fid_evalnet ----------------------------------------------------------------------------
    for group, (fa, fb) in (("fid", (inc_feats, inc_pfeats)), ("fid_evalnet", (e_feats, e_pfeats))):
        if group not in groups:
            continue
        t0 = time.perf_counter()
        if fa is None:
            mark_missing(group, inception_reason())
        else:
            try:
                put(None, {group: frechet_distance(fa, fb)})
            except ValueError as e:
                mark_missing(group, f"Fréchet distance failed: {e}")
        timings[group] = time.perf_counter() - t0

    # -- PRDC ---------------------------------------------------------------------------------------------
    if "prdc" in groups:
        t0 = time.perf_counter()
        fr, fp = (inc_feats, inc_pfeats) if cfg.prdc_features == "inception" else (e_feats, e_pfeats)
        if fr is None:
            mark_missing("prdc", inception_reason())
        elif cfg.prdc_scope == "global":
            try:
                put(None, prdc(fp, fr, cfg.prdc_k))
            except ValueError as e:
                mark_missing("prdc", f"PRDC (global): {e}")
        else:
            rows, skipped = {}, []
            for c in torch.unique(labels).tolist():
                try:
                    rows[int(c)] = prdc(fp[private_labels == c], fr[labels == c], cfg.prdc_k)
                except ValueError:
                    skipped.append(int(c))
            if not rows:
                mark_missing("prdc", f"PRDC per class needs more than k={cfg.prdc_k} reconstructions and "
                                     f"private images in a class; no class has that")
            else:
                put(rows, {m: sum(r[m] for r in rows.values()) / len(rows) for m in PRDC_NAMES})
                if skipped:
                    for m in PRDC_NAMES:
                        notes[m] = (f"mean over {len(rows)} classes; {len(skipped)} class(es) with <= "
                                    f"k={cfg.prdc_k} images skipped")
        timings["prdc"] = time.perf_counter() - t0

    # -- piq IQA metrics, pairwise -------------------------------------------------------------------
    iqa = [g for g in groups if g in IQA_SPECS]
    if iqa:
        ri, pj = same_class_pairs(labels, private_labels)
        by_class = torch.argsort(labels[ri], stable=True)   # class by class: per-image caches stay warm
        ri, pj = ri[by_class], pj[by_class]
        prepared: dict[tuple[bool, int], tuple[Tensor, Tensor]] = {}
        for name in iqa:
            spec = IQA_SPECS[name]
            t0 = time.perf_counter()
            key = preparation_key(spec, images.shape)
            if key not in prepared:  # once per image and requirement, shared by metrics; no copy if unchanged
                prepared[key] = (prepare_images(images, spec.min_side, spec.rgb, cfg.resize_mode),
                                 prepare_images(private_images, spec.min_side, spec.rgb, cfg.resize_mode))
            x, y = prepared[key]
            best = pairwise_iqa(name, x, y, ri, pj, pairing=cfg.pairing, chunk=cfg.pair_batch(name), device=dev,
                                memo=cfg.iqa_memo, memo_mb=cfg.feature_cache_mb)
            put({c: {name: v} for c, v in _per_class_mean(best, labels).items()}, {name: _nanmean(best)})
            note = resize_note(spec.min_side, h, w)
            if note:
                notes[name] = note
            timings[name] = time.perf_counter() - t0

    # -- LPIPS, pairwise with backbone features once per image ------------------------------------------
    for name in (g for g in groups if g in LPIPS_NETS):
        t0 = time.perf_counter()
        path, reason = resolved[name]
        if reason is not None:
            mark_missing(name, reason)
            continue
        net, min_side = LPIPS_NETS[name]
        model = extractors[name] if name in extractors else load_lpips(net, path)
        best = pairwise_lpips(model, images, labels, private_images, private_labels,
                              reduce=pair_reduce(False, cfg.pairing), min_side=min_side,
                              resize_mode=cfg.resize_mode, feature_batch=cfg.feature_batch_size,
                              pair_chunk=cfg.pair_batch(name), cache_mb=cfg.feature_cache_mb, device=dev)
        put({c: {name: v} for c, v in _per_class_mean(best, labels).items()}, {name: _nanmean(best)})
        note = resize_note(min_side, h, w)
        if note:
            notes[name] = note
        timings[name] = time.perf_counter() - t0

    for m, r in missing.items():
        log(f"[metrics] {m}: missing ({r})")
    pc = pd.DataFrame([(c, m, v) for (c, m), v in per_class.items()], columns=["class", "metric", "value"])
    if len(pc):
        pc = pc.sort_values(["class", "metric"], key=lambda s: s.map(_order) if s.name == "metric" else s,
                            kind="stable").reset_index(drop=True)
    ag = pd.DataFrame(sorted(agg.items(), key=lambda kv: _order(kv[0])), columns=["metric", "value"])
    log("[metrics] " + ", ".join(f"{m}={v:.4g}" for m, v in zip(ag["metric"], ag["value"]) if not math.isnan(v)))
    return EvaluationResult(per_class=pc, aggregate=ag, missing=missing, notes=notes, timings=timings)
