"""Benchmark: the batched metric suite vs a naive per-pair loop (the official Diff-MI code's pattern).

Setting (default): 300 classes x 5 reconstructions = 1500 reconstructions vs 30 private images per
class (9000), 64x64 RGB, i.e. 45,000 same-class pairs per pairwise metric. Images are random but
smooth (class-specific low-frequency patterns plus noise), so metrics are not degenerate.

What is timed, in one run:
  batched    ``evaluate_reconstructions`` on every pair, for every metric whose weights are available
             (Inception / LPIPS metrics are skipped offline and listed), E = a small random CNN.
  reference  for each pairwise metric, the official loop: for each reconstruction, for each private image
             of its class, one piq call on a single pair, keep the best. Run on a random sample of
             reconstructions (all their pairs) and EXTRAPOLATED linearly to all pairs (a full loop would
             take hours on CPU); KNN Dist's reference loop (per reconstruction, as ``calc_knn``) runs in full,
             against the batched nearest-distance function on the same precomputed features.

Each metric's reference runs right after its batched run, so both see the same machine load. Prints
per-metric seconds, the per-metric ratio reference/batched and the ratio over the metrics that have a
reference. Run: ``python benchmarks/bench_metrics.py [--small] [--metrics psnr ssim ...]``.

``--small``: 10 classes x 5 vs 8 private per class, 32x32, no VSI, reference sample of 4
reconstructions — under a minute on 2 CPU cores. Both sides run on ``--threads`` torch threads (default 1)
and the ratio is of process CPU time, which other jobs on a shared machine inflate less than wall time.

Measured on the 2-core development machine (CPU, 1 torch thread, Inception/LPIPS weights absent): the
default setting took 465 s batched; reference/batched = 5.6x over the eight piq metrics and KNN Dist
(VSI 7.7x, DSS 10.9x, SR-SIM 5.3x, FSIM 5.0x, HaarPSI 2.8x, SSIM 1.8x, MDSI 1.7x, PSNR 1.5x). SSIM,
MDSI and PSNR are compute-bound per pair on CPU, so batching gains little there.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffmi_ray.config.evaluation import ALL_METRICS, EvaluationConfig  # noqa: E402
from diffmi_ray.metrics import available_feature_extractors, evaluate_reconstructions  # noqa: E402
from diffmi_ray.metrics.classification import nearest_private_sqdist  # noqa: E402
from diffmi_ray.metrics.iqa import IQA_SPECS, prepare_images  # noqa: E402
from diffmi_ray.metrics.pairs import same_class_pairs  # noqa: E402


class SmallE(nn.Module):
    """A small random CNN standing in for the evaluation classifier (timing only)."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))

    def features_and_logits(self, x):
        f = self.body(x)
        return f, self.head(f)


def make_data(classes: int, per_class: int, private_per_class: int, size: int, seed: int = 0):
    """Smooth random images in [0, 1]: a per-class 8x8 pattern upsampled, plus per-image variation."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(classes, 3, 8, 8, generator=g)

    def draw(n_per: int):
        lab = torch.arange(classes).repeat(n_per)                 # repeat-major order, like the attack output
        low = base[lab] + 0.35 * torch.randn(lab.numel(), 3, 8, 8, generator=g)
        img = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        img = img + 0.05 * torch.randn(img.shape, generator=g)
        return img.clamp(0, 1), lab

    recon, labels = draw(per_class)
    private, plabels = draw(private_per_class)
    return recon, labels, private, plabels


class Clock:
    """Wall and process-CPU seconds of a block. CPU time is the robust figure on a shared machine
    (other jobs stretch wall time, not our CPU time); with one torch thread the two agree when idle."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def reference_loop(name: str, recon, labels, private, plabels, sample: torch.Tensor) -> tuple[Clock, int]:
    """The official per-pair loop for the reconstructions in ``sample``: (clock, number of pairs)."""
    import piq

    spec = IQA_SPECS[name]
    fn = getattr(piq, spec.fn_name)
    kw = spec.kwargs(recon.shape[1])
    x = prepare_images(recon, spec.min_side, spec.rgb)
    y = prepare_images(private, spec.min_side, spec.rgb)
    pairs = 0
    with warnings.catch_warnings(), Clock() as clock:
        warnings.simplefilter("ignore")
        for i in sample.tolist():
            best = None
            for j in torch.nonzero(plabels == labels[i]).flatten().tolist():
                v = fn(x[i:i + 1], y[j:j + 1], data_range=1.0, **kw)
                best = v if best is None else (torch.minimum(best, v) if name == "mdsi" else torch.maximum(best, v))
                pairs += 1
    return clock, pairs


def knn_reference(feats, labels, pfeats, plabels) -> Clock:
    """The official ``calc_knn`` loop (one reconstruction at a time), in full."""
    total = 0.0
    with Clock() as clock:
        for i in range(feats.shape[0]):
            idx = torch.nonzero(plabels == labels[i]).squeeze(1)
            total += float(((feats[i].repeat(idx.numel(), 1) - pfeats[idx]) ** 2).sum(1).min())
    return clock


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny setting, under a minute on 2 CPU cores")
    ap.add_argument("--metrics", nargs="+", default=None, help=f"metric groups (default: all of {ALL_METRICS})")
    ap.add_argument("--ref-recons", type=int, default=None,
                    help="reconstructions in the reference loop sample (each with all its pairs)")
    ap.add_argument("--classes", type=int, default=None, help="override the number of classes (default 300)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides (default 1)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.small:
        classes, per, priv, size, ref_n = 10, 5, 8, 32, 4
        default_metrics = [m for m in ALL_METRICS if m != "vsi"]
    else:
        classes, per, priv, size, ref_n = 300, 5, 30, 64, 10
        default_metrics = list(ALL_METRICS)
    ref_n = args.ref_recons or ref_n
    classes = args.classes or classes
    metrics = args.metrics or default_metrics
    cfg = EvaluationConfig(metrics=metrics, write_grid=False)
    avail = available_feature_extractors(cfg, log=lambda s: None)
    drop = {"inception": ["fid", "prdc"], "lpips_alex": ["lpips_alex"], "lpips_vgg": ["lpips_vgg"]}
    for n, r in avail.items():
        if r:
            metrics = [m for m in metrics if m not in drop[n]]
            print(f"skipped {drop[n]}: {n} weights unavailable ({r.split(' and ')[0]})")

    recon, labels, private, plabels = make_data(classes, per, priv, size)
    ri, _ = same_class_pairs(labels, plabels)
    n_pairs = ri.numel()
    print(f"setting: {classes} classes x {per} reconstructions vs {priv} private/class, {size}x{size} RGB, "
          f"{n_pairs} pairs per pairwise metric; torch threads {torch.get_num_threads()}; device {args.device}")
    e = SmallE(3, classes).eval()

    # Each metric group: the batched suite (its own clock, same code path as a full run), then right
    # after it, under the same machine load, the reference loop on a fixed sample of reconstructions.
    g = torch.Generator().manual_seed(1)
    sample = torch.randperm(recon.shape[0], generator=g)[:ref_n]
    batched: dict[str, Clock] = {}
    rows = []  # (metric, batched clock, reference cpu, reference wall, how)
    for m in metrics:
        with warnings.catch_warnings(), Clock() as clock:
            warnings.simplefilter("ignore")
            evaluate_reconstructions(recon, labels, private, plabels, e, cfg.model_copy(update={"metrics": [m]}),
                                     device=args.device, log=lambda s: None)
        batched[m] = clock
        line = f"  batched {m:<12} cpu {clock.cpu:8.2f} s  wall {clock.wall:8.2f} s"
        if m in IQA_SPECS:
            ref, pairs = reference_loop(m, recon, labels, private, plabels, sample)
            f = n_pairs / pairs
            rows.append((m, clock, ref.cpu * f, ref.wall * f, f"extrapolated x{f:.0f} from {pairs} pairs"))
            line += f"   reference ({pairs} pairs) cpu {ref.cpu:6.2f} s"
        print(line, flush=True)
    print(f"batched suite: cpu {sum(c.cpu for c in batched.values()):.1f} s, "
          f"wall {sum(c.wall for c in batched.values()):.1f} s")
    if "knn" in metrics:  # both sides on precomputed E features (the suite's knn time also runs E)
        with torch.no_grad():
            feats, _ = e.features_and_logits(recon)
            pfeats, _ = e.features_and_logits(private)
        with Clock() as fast:
            nearest_private_sqdist(feats, labels, pfeats, plabels)
        clock = knn_reference(feats, labels, pfeats, plabels)
        rows.append(("knn", fast, clock.cpu, clock.wall, "full loop; both sides on precomputed features"))

    print(f"\n{'metric':<10}{'batched cpu s':>15}{'reference cpu s':>17}{'ratio':>8}   reference")
    for name, b, rc, rw, how in rows:
        print(f"{name:<10}{b.cpu:>15.2f}{rc:>17.2f}{rc / b.cpu:>7.1f}x   {how}")
    tb, tr = sum(r[1].cpu for r in rows), sum(r[2] for r in rows)
    twb, twr = sum(r[1].wall for r in rows), sum(r[3] for r in rows)
    print(f"\nRATIO reference/batched (CPU time) over {', '.join(r[0] for r in rows)}: "
          f"{tr:.1f} s / {tb:.1f} s = {tr / tb:.2f}x (target >= 5x)")
    print(f"(wall time: {twr:.1f} s / {twb:.1f} s = {twr / twb:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
