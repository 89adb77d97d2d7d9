"""Diff-MI step 1c: fine-tune the pretrained CDM on the target classifier T (per-worker loop).

Paper §III-B eq. 3 / PROTOCOL.md §3 Step 1c::

    L_Fine-tune = E_{x_T ~ N(0, I), y} [ L_cls( T(D(x_T, y)), y ) ]
    L_cls       = top-k(logits, y; k) + alpha * p-reg(features, centroid_y)

``D`` is a short differentiable sampler: DPM-Solver++(2M) with ``sampler_steps`` steps on the
classifier-free-guided model ``eps_w = w eps(y) - (w - 1) eps(null)`` (:class:`CFGModel`); the loss
back-propagates through the whole chain into the trainable parameters. Trainable: the label
embedding and a few middle-block layers (paper Fig. 2 / 6a indexing 1..13, see
:func:`diffmi_ray.models.unet.middle_block_layers`); everything else has ``requires_grad = False``.

Pieces (each tested on its own):

* :func:`select_layers` -- top-L layers by change rate (ties: the lower index wins).
* :func:`change_rates` -- Delta_l = ||theta'_l - theta_l|| / ||theta_l|| over each layer's parameters.
* :func:`loss_target_indices` -- which x0-predictions enter the loss (see below).
* :class:`DifferentiableSampler` -- ``(x_T, y) -> [loss targets]``; the module DDP wraps, so one
  DDP forward covers all n model evaluations of a step (gradient sync once per backward).
* :func:`classifier_loss` -- L_cls of T on ``aug_copies`` random augmentations of every target.
* :func:`epoch_batches` -- an epoch's class batches for one worker.
* :func:`run_finetune` -- the probe (when ``layers`` is an int) and the fine-tuning epochs, with
  checkpoints, reports and the stopping rule.

Loss targets. The official code (``return_pred_x0=True`` of its DPM-Solver, 10 steps) uses 8 tensors:
the x0-predictions d_3 .. d_9 of model evaluations 3..9 and the final sample; the three noisiest
evaluations (t = 999, 899, 799, the solver's warm-up ``step <= order``) are left out. For fewer
steps we keep the same fraction of the chain: skip ``min(3, ceil(3 n / 10))`` evaluations, i.e. the
noisiest ~30 %, which is exactly the official rule for every n >= 7 (n = 4: d_2, d_3 + sample;
n = 2: d_1 + sample). With ``official_intermediates=False`` every evaluation's x0-prediction
d_0 .. d_{n-1} plus the sample is used.

Augmentation (kornia, per image): RandomResizedCrop(scale 0.8-1, ratio 1), ColorJitter(brightness
0.2, contrast 0.2, p=0.5), horizontal flip (p=0.5), rotation +-5 deg. Images go to [0, 1] as
``clamp((x + 1) / 2, 0, 1)`` BEFORE augmenting and are clamped to [0, 1] again after (kornia's
colour ops assume and clip to [0, 1]; the official code augments in [-1, 1], where kornia's
brightness clip zeroes negative pixels whenever the jitter fires -- we do not reproduce that).

Accuracy and stopping. The step accuracy is T's top-1 accuracy on the augmented final samples (the
views already computed for the loss; the official code measures the last ``B * aug_copies`` rows,
which mixes d_9 and the sample). The epoch accuracy sums correct/total over the epoch and over all
workers; training stops when it reaches ``acc_threshold`` or after ``max_epochs`` epochs.

Epochs, workers, randomness. An epoch visits every class 0..C-1 once in a permutation keyed by
(seed, epoch), in global batches of ``batch_size`` classes; worker r takes every world-th class of
each global batch (a worker left empty by a short last batch re-uses a class, excluded from the
accuracy), so all workers run the same number of steps and see different classes and noise. x_T of
class position p in epoch e comes from ``per_sample_noise`` keyed by (seed, phase, e, p), and the
augmentation RNG (torch's global generator, which kornia uses) is re-seeded from (seed, phase, rank,
e) at every epoch start: a run resumed at an epoch boundary replays exactly the epochs an
uninterrupted run would have. The U-Net runs in eval mode (no dropout in the chain); T is frozen in
eval mode.

Latent CDMs (Table VI): the sampler runs in the latent space and every loss target is decoded by
the frozen first-stage decoder (:class:`~diffmi_ray.models.autoencoder.LatentCodec`, resized to the
data's image size) before T sees it; gradients flow through the decoder into the U-Net. With
``grad_checkpointing`` each decode is recomputed in backward too.

Optimiser: AdamW(lr, weight_decay=0) on the trainable parameters (the official setting; torch's
default weight decay of 0.01 is not used).

Memory: backprop through n U-Net evaluations stores n sets of activations (official: ~24 GB at
batch 4, 64 px). ``grad_checkpointing`` wraps each solver step's model evaluation in non-reentrant
``torch.utils.checkpoint`` (``dpm_solver_pp_2m(checkpoint_steps=True)``): backward keeps only each
step's input and recomputes one evaluation at a time, so the peak is about one evaluation's
activations (one extra forward per step). Gradients are identical. ``benchmarks/bench_finetune_memory.py``
measures both modes.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Sequence

import kornia.augmentation as KA
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import Tensor, nn

from diffmi_ray.attacks.losses import l_cls
from diffmi_ray.config.methods import FinetuneConfig
from diffmi_ray.conventions import from_pm1, per_sample_noise, sample_generator
from diffmi_ray.diffusion import CFGModel, DPMSolverOutput, Schedule, dpm_solver_pp_2m
from diffmi_ray.models.unet import NUM_MIDDLE_LAYERS, finetune_parameter_names, middle_block_layers
from diffmi_ray.training.common import all_reduce_sum, is_distributed, unwrap, wrap_ddp

__all__ = ["ALL_LAYERS", "FinetuneResult", "DifferentiableSampler", "select_layers", "change_rates",
           "loss_target_indices", "make_augment", "classifier_loss", "epoch_batches", "set_trainable",
           "run_finetune", "PROBE", "MAIN"]

ALL_LAYERS: tuple[int, ...] = tuple(range(1, NUM_MIDDLE_LAYERS + 1))
PROBE, MAIN = 0, 1  # phase ids (keys of the noise and augmentation streams)


# ----------------------------------------------------------------------------------------------
# layer selection


def select_layers(change_rate: Sequence[float], L: int) -> list[int]:
    """The L layer indices (1-based, as in Fig. 6a) with the highest change rate, ascending.

    ``change_rate[i]`` belongs to layer i + 1. Ties are broken towards the lower layer index (a
    stable sort), NaN counts as lowest. Raises ValueError unless 1 <= L <= len(change_rate).
    """
    rates = [float(r) for r in change_rate]
    if not 1 <= L <= len(rates):
        raise ValueError(f"L must be in 1..{len(rates)}, got {L}")
    key = [(-r if r == r else math.inf, i) for i, r in enumerate(rates)]  # NaN -> last
    order = sorted(range(len(rates)), key=lambda i: key[i])
    return sorted(i + 1 for i in order[:L])


@torch.no_grad()
def change_rates(before: dict[str, Tensor], unet: nn.Module) -> list[float]:
    """Delta_l = ||theta'_l - theta_l|| / ||theta_l|| for the 13 middle-block layers l = 1..13.

    ``before`` maps parameter names to the original tensors (at least every middle-block parameter);
    ``unet`` holds the changed ones. Norms are Frobenius norms over all of a layer's parameters
    (weight and bias together). A layer whose original norm is 0 gets ||theta'_l - theta_l|| / 1e-12.
    """
    params = dict(unwrap(unet).named_parameters())
    out = []
    for _, _, names in middle_block_layers(unwrap(unet)):
        num = sum(float((params[n].detach().double().cpu() - before[n].double().cpu()).pow(2).sum()) for n in names)
        den = sum(float(before[n].double().pow(2).sum()) for n in names)
        out.append(math.sqrt(num) / max(math.sqrt(den), 1e-12))
    return out


def set_trainable(unet: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """Freeze every parameter except ``names`` (returned in ``named_parameters`` order)."""
    names = set(names)
    out = []
    for n, p in unwrap(unet).named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            out.append(p)
    missing = names - {n for n, _ in unwrap(unet).named_parameters()}
    if missing:
        raise KeyError(f"no such parameters: {sorted(missing)}")
    return out


# ----------------------------------------------------------------------------------------------
# the differentiable sampler and the loss


def loss_target_indices(n: int, official: bool = True) -> list[int]:
    """Indices into the n x0-predictions d_0..d_{n-1} that enter the loss (the sample always does).

    official: skip the first ``min(3, ceil(3n/10))`` (the noisiest ~30 %; exactly the official
    d_3..d_9 at n = 10 and the official rule for all n >= 7); else all n.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not official:
        return list(range(n))
    skip = min(3, (3 * n + 9) // 10)
    return list(range(skip, n))


class DifferentiableSampler(nn.Module):
    """``forward(x_T, y) -> [d_i for i in loss_target_indices] + [sample]``, all (B, C, H, W) in ~[-1, 1].

    DPM-Solver++(2M), ``steps`` steps over the default time-uniform grid 999 -> 0, on
    ``CFGModel(unet, guidance, unet.null_label)``; ``checkpoint_steps`` recomputes each model
    evaluation in backward. Gradients flow to whichever U-Net parameters require them.
    """

    def __init__(self, unet: nn.Module, sched: Schedule, *, steps: int = 10, guidance: float = 3.0,
                 official_intermediates: bool = True, checkpoint_steps: bool = True):
        super().__init__()
        self.model = CFGModel(unet, guidance, unet.null_label)
        self.sched = sched
        self.steps = int(steps)
        self.indices = loss_target_indices(self.steps, official_intermediates)
        self.checkpoint_steps = bool(checkpoint_steps)

    @property
    def unet(self) -> nn.Module:
        return self.model.model

    def chain(self, x_T: Tensor, y: Tensor) -> DPMSolverOutput:
        return dpm_solver_pp_2m(self.model, self.sched, x_T, y=y, n=self.steps, return_intermediates=True,
                                checkpoint_steps=self.checkpoint_steps)

    def forward(self, x_T: Tensor, y: Tensor) -> list[Tensor]:
        out = self.chain(x_T, y)
        return [out.pred_x0s[i] for i in self.indices] + [out.sample]


def make_augment(image_size: int) -> nn.Module:
    """The fine-tuning augmentation on [0, 1] images (B, C, H, W); random parameters per image.

    Draws from torch's global RNG (kornia); differentiable w.r.t. the images.
    """
    return KA.container.ImageSequential(
        KA.RandomResizedCrop((image_size, image_size), scale=(0.8, 1.0), ratio=(1.0, 1.0)),
        KA.ColorJitter(brightness=0.2, contrast=0.2, p=0.5),
        KA.RandomHorizontalFlip(),
        KA.RandomRotation(5.0),
    )


def _features_and_logits(target: nn.Module, x: Tensor, need_features: bool) -> tuple[Tensor | None, Tensor]:
    if need_features:
        if not hasattr(target, "features_and_logits"):
            raise TypeError(f"{type(target).__name__} has no features_and_logits(); p-reg (alpha > 0) needs it")
        return target.features_and_logits(x)
    return None, target(x)


def classifier_loss(target: nn.Module, targets: Sequence[Tensor], y: Tensor, *, augment: nn.Module | None,
                    copies: int, k: int, alpha: float, centroids: Tensor | None) -> tuple[Tensor, Tensor]:
    """L_cls of T over ``copies`` augmented views of each of the K loss targets.

    targets: K tensors (B, C, H, W) in the diffusion range; y: (B,) labels. Views are stacked as
    [copy 0: target 0 .. K-1, copy 1: ...], each block of B rows in label order (labels tiled, as in
    the official code). Returns (scalar loss = top-k(k) + alpha * p-reg, correct (copies, B) float:
    whether T's top-1 on each augmented FINAL sample equals y).
    """
    K, B = len(targets), y.shape[0]
    imgs = from_pm1(torch.cat(list(targets))).clamp(0.0, 1.0)  # (K*B, C, H, W) in [0, 1]
    views = [augment(imgs).clamp(0.0, 1.0) if augment is not None else imgs for _ in range(copies)]
    x = torch.cat(views)  # (copies*K*B, C, H, W)
    labels = y.repeat(copies * K)
    feats, logits = _features_and_logits(target, x, alpha > 0)
    loss = l_cls(logits, labels, loss="topk_preg", k=k, alpha=alpha, features=feats, centroids=centroids)
    final = logits.detach().view(copies, K, B, -1)[:, -1]  # (copies, B, classes)
    correct = (final.argmax(dim=-1) == y.view(1, B)).float()
    return loss, correct


# ----------------------------------------------------------------------------------------------
# epochs


@dataclass
class ClassBatch:
    """One worker's share of a global step: class labels, their epoch positions, whether padding."""

    labels: Tensor      # (b,) long
    positions: list[int]
    padded: bool


def epoch_batches(num_classes: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  phase: int = MAIN) -> list[ClassBatch]:
    """This worker's batches of an epoch: classes 0..num_classes-1 permuted by (seed, phase, epoch),
    cut into global batches of ``batch_size``, worker ``rank`` taking positions rank, rank+world, ...
    of each. Every worker gets ceil(num_classes / batch_size) batches (DDP needs equal step counts);
    one left empty re-uses position (start + rank) mod num_classes and is marked ``padded``."""
    perm = torch.randperm(num_classes, generator=sample_generator(seed, 0xC1A5, phase, epoch))
    out = []
    for start in range(0, num_classes, batch_size):
        pos = list(range(start, min(start + batch_size, num_classes)))[rank::world]
        padded = not pos
        if padded:
            pos = [(start + rank) % num_classes]
        out.append(ClassBatch(perm[pos], pos, padded))
    return out


def _epoch_seed(seed: int, phase: int, rank: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + phase * 65_537 + int(epoch) * 7919 + int(rank) * 104_729) % (2**63 - 1)


@dataclass
class FinetuneResult:
    selected: list[int]
    change_rate: list[float] | None
    epochs: int
    final_acc: float
    stopped: str                    # "threshold" | "max_epochs"
    history: list[dict]
    resumed_from: int
    probe_seconds: float
    seconds: float


class _Step:
    """One optimisation step's machinery for a given trainable set (DDP-wrapped sampler + AdamW)."""

    def __init__(self, unet, sched, target, centroids, cfg: FinetuneConfig, ctx, names: list[str], codec=None):
        self.params = set_trainable(unet, names)
        self.codec = codec
        self.names = names
        sampler = DifferentiableSampler(unet, sched, steps=cfg.sampler_steps, guidance=cfg.guidance,
                                        official_intermediates=cfg.official_intermediates,
                                        checkpoint_steps=cfg.grad_checkpointing)
        self.sampler = wrap_ddp(sampler, ctx.device)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.target, self.centroids, self.cfg, self.ctx = target, centroids, cfg, ctx
        self.augment = make_augment(codec.output_size if codec is not None else unet.image_size)
        self.shape = (unet.in_channels, unet.image_size, unet.image_size)

    def _decode(self, z: Tensor) -> Tensor:
        if self.cfg.grad_checkpointing:
            return torch.utils.checkpoint.checkpoint(self.codec.decode, z, use_reentrant=False)
        return self.codec.decode(z)

    def __call__(self, batch: ClassBatch, phase: int, epoch: int) -> tuple[float, Tensor]:
        cfg, ctx = self.cfg, self.ctx
        y = batch.labels.to(ctx.device)
        x_T = per_sample_noise(self.shape, ctx.seed, [(phase, epoch, p, int(batch.padded)) for p in batch.positions],
                               device=ctx.device)
        self.opt.zero_grad(set_to_none=True)
        targets = self.sampler(x_T, y)
        if self.codec is not None:
            targets = [self._decode(z) for z in targets]
        loss, correct = classifier_loss(self.target, targets, y, augment=self.augment, copies=cfg.aug_copies,
                                        k=cfg.loss_k, alpha=cfg.loss_alpha, centroids=self.centroids)
        ctx.check_finite("fine-tuning loss", loss)
        loss.backward()
        self.opt.step()
        return float(loss.detach()), (correct if not batch.padded else correct[:, :0])


def _world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _probe(unet, sched, target, centroids, cfg: FinetuneConfig, ctx, num_classes: int, codec=None) -> list[float]:
    """Fine-tune all 13 middle-block layers + label_emb for ``probe_steps`` steps; return Delta_1..13.

    The caller restores the pretrained weights afterwards.
    """
    rank, world = _world()
    names = finetune_parameter_names(unwrap(unet), ALL_LAYERS, include_label_emb=True)
    before = {n: p.detach().clone() for n, p in unwrap(unet).named_parameters() if n in set(names)}
    step = _Step(unet, sched, target, centroids, cfg, ctx, names, codec)
    done, epoch = 0, 0
    while done < cfg.probe_steps:
        torch.manual_seed(_epoch_seed(ctx.seed, PROBE, rank, epoch))
        for batch in epoch_batches(num_classes, cfg.batch_size, ctx.seed, epoch, rank, world, PROBE):
            loss, _ = step(batch, PROBE, epoch)
            done += 1
            if done >= cfg.probe_steps:
                break
        epoch += 1
    rates = change_rates(before, unet)
    del step
    gc.collect()  # drop the probe's DDP wrapper (its gradient hooks) before the main phase wraps again
    with torch.no_grad():
        for n, p in unwrap(unet).named_parameters():
            if n in before:
                p.copy_(before[n])
    return rates


def run_finetune(unet: nn.Module, sched: Schedule, target: nn.Module, centroids: Tensor | None,
                 cfg: FinetuneConfig, ctx, *, num_classes: int | None = None, codec=None) -> FinetuneResult:
    """Fine-tune ``unet`` in place on classes 0..num_classes-1 (default ``cfg.classes``).

    ``ctx`` supplies seed, device, rank, save_checkpoint/load_checkpoint, report, log and
    check_finite (a :class:`~diffmi_ray.pipeline.context.StageContext`). The U-Net must be the
    pretrained CDM (on ``ctx.device``); T is used frozen. When ``cfg.layers`` is an int L, a probe
    first measures the 13 change rates and the top-L layers are trained from the pretrained weights;
    a list is used as given. Resumes from ``ctx.load_checkpoint()`` (probe result + finished epochs).
    Afterwards every parameter has ``requires_grad = False`` again. ``codec``: the latent CDM's
    :class:`~diffmi_ray.models.autoencoder.LatentCodec` (None for a pixel-space CDM).
    """
    C = int(num_classes if num_classes is not None else cfg.classes)
    if C < 1:
        raise ValueError("fine-tuning needs at least one class")
    rank, world = _world()
    bare = unwrap(unet)
    bare.eval()
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    t_start = time.time()

    state = ctx.load_checkpoint() or {}
    change_rate = state.get("change_rate")
    selected = state.get("selected")
    probe_seconds = float(state.get("probe_seconds", 0.0))
    if selected is None:
        if isinstance(cfg.layers, int):
            ctx.log(f"probe: fine-tuning all {NUM_MIDDLE_LAYERS} middle-block layers for {cfg.probe_steps} steps")
            t0 = time.time()
            change_rate = _probe(unet, sched, target, centroids, cfg, ctx, C, codec)
            probe_seconds = time.time() - t0
            selected = select_layers(change_rate, cfg.layers)
            ctx.log("change rates " + " ".join(f"{i}:{r:.3g}" for i, r in zip(ALL_LAYERS, change_rate))
                    + f"; top-{cfg.layers} = {selected} ({probe_seconds:.1f} s)")
        else:
            change_rate, selected = None, sorted(int(i) for i in cfg.layers)
        state = {"change_rate": change_rate, "selected": selected, "probe_seconds": probe_seconds,
                 "epoch": 0, "history": []}
        ctx.save_checkpoint(state)

    names = finetune_parameter_names(bare, selected, include_label_emb=True)
    step = _Step(unet, sched, target, centroids, cfg, ctx, names, codec)
    start = int(state.get("epoch", 0))
    history = list(state.get("history", []))
    if state.get("trainable") is not None:
        with torch.no_grad():
            params = dict(bare.named_parameters())
            for n, v in state["trainable"].items():
                params[n].copy_(v)
        step.opt.load_state_dict(state["opt"])
        ctx.log(f"resumed after epoch {start}")
    final_acc = history[-1]["acc"] if history else 0.0
    stopped = state.get("stopped")

    epoch = start
    while stopped is None and epoch < cfg.max_epochs:
        t0 = time.time()
        torch.manual_seed(_epoch_seed(ctx.seed, MAIN, rank, epoch))
        stats = torch.zeros(4, dtype=torch.float64)  # loss sum, steps, correct, total
        for batch in epoch_batches(C, cfg.batch_size, ctx.seed, epoch, rank, world, MAIN):
            loss, correct = step(batch, MAIN, epoch)
            stats += torch.tensor([loss, 1.0, float(correct.sum()), float(correct.numel())], dtype=torch.float64)
        stats = all_reduce_sum(stats.to(ctx.device)).cpu()
        epoch += 1
        final_acc = float(stats[2] / max(stats[3], 1.0))
        row = {"epoch": epoch, "acc": final_acc, "loss": float(stats[0] / max(stats[1], 1.0)),
               "seconds": round(time.time() - t0, 3)}
        history.append(row)
        if final_acc >= cfg.acc_threshold:
            stopped = "threshold"
        elif epoch >= cfg.max_epochs:
            stopped = "max_epochs"
        ctx.save_checkpoint({"change_rate": change_rate, "selected": selected, "probe_seconds": probe_seconds,
                             "epoch": epoch, "history": history, "stopped": stopped,
                             "trainable": {n: p.detach().cpu().clone() for n, p in bare.named_parameters()
                                           if n in set(names)},
                             "opt": step.opt.state_dict()})
        ctx.log(f"epoch {epoch}/{cfg.max_epochs}: acc {final_acc:.3f} loss {row['loss']:.4f} ({row['seconds']:.1f} s)")
        ctx.report(dict(row))
    if stopped is None:  # max_epochs already reached by the resumed state
        stopped = "max_epochs"
    for p in bare.parameters():
        p.requires_grad_(False)
    return FinetuneResult(selected=list(selected), change_rate=change_rate, epochs=epoch, final_acc=final_acc,
                          stopped=stopped, history=history, resumed_from=start, probe_seconds=probe_seconds,
                          seconds=time.time() - t_start)
