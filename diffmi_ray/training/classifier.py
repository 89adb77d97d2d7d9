"""Per-worker classifier training loop (target T and evaluation classifier E), optionally with BiDO.

One function, :func:`fit`, runs on every Ray Train worker (a process group is up: DDP, gloo on CPU,
nccl on GPU) or alone in one process; :mod:`diffmi_ray.training.common` hides the difference.

Recipe (PROTOCOL.md §1, every number configurable in
:class:`~diffmi_ray.config.classifier.ClassifierTrainConfig`): cross-entropy, SGD with momentum and
weight decay, MultiStepLR stepped once per epoch at ``lr_milestones`` (epochs), global batch
``batch_size`` split evenly over the workers, random horizontal flip and random-crop augmentation.
With ``bido.enabled`` the loss becomes (Peng et al., KDD 2022, :mod:`diffmi_ray.defenses.bido`)::

    L = CE(f(X), Y) + sum_j [ lambda_x * dep(X, Z_j) - lambda_y * dep(Z_j, Y) ]

over the model's hidden representations Z_j (``forward_with_hidden``), on each worker's mini-batch.

Resumability: after every epoch the model, optimizer, scheduler and metric history are saved with
``ctx.save_checkpoint``; a restarted run continues at the next epoch. The random streams (dropout,
augmentation) are re-seeded from (seed, rank, epoch) at the start of every epoch, and the loader's
shuffle from (seed, epoch), so a resumed run replays exactly the epochs an uninterrupted run would have
(no RNG state needs saving).

Metrics (loss, accuracy) are sums all-reduced over workers, so every rank reports the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from diffmi_ray.config.classifier import ClassifierTrainConfig
from diffmi_ray.defenses.bido import bido_terms
from diffmi_ray.training.common import all_reduce_sum, is_distributed, set_epoch, sharded_loader, unwrap, wrap_ddp

#: batch size of evaluation passes (per worker; no gradients, so larger than the training batch)
EVAL_BATCH = 256


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the running process group, or (0, 1) without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the random streams of one worker in one epoch (0-based epoch index)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank) * 104_729) % (2**63 - 1)


def augment(x: Tensor, *, hflip: bool, pad: int, generator: torch.Generator) -> Tensor:
    """Random horizontal flip (p = 0.5 per image) and random crop after zero padding by ``pad`` pixels.

    x: (B, C, H, W) float in [0, 1]; returns a new tensor of the same shape. The random draws come
    from the CPU ``generator`` (independent of the batch's device).
    """
    b, _, h, w = x.shape
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        if flip.any():
            x = x.clone()
            idx = flip.nonzero().squeeze(1).to(x.device)
            x[idx] = x[idx].flip(-1)
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))  # zeros, as torchvision's RandomCrop(padding=pad)
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[bi, ci, rows, cols]  # (B, C, H, W)
    return x


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every worker (no-op without a group).

    DDP averages gradients, so parameters agree across workers, but each worker updates its running
    statistics from its own shard; this makes the evaluated and saved model the same on every rank.
    """
    if not is_distributed():
        return
    for b in unwrap(model).buffers():
        dist.broadcast(b.data, src=0)


def broadcast_object(obj):
    """``obj`` of rank 0 on every worker (identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, device: torch.device, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on images x (N, C, H, W) in [0, 1], labels y (N,).

    Under a process group each worker scores every world_size-th sample and the counts are summed,
    so all ranks return the same number. The model's train/eval mode is restored afterwards.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    rank, world = rank_world()
    xs, ys = x[rank::world], y[rank::world]
    correct = torch.zeros(2, dtype=torch.float64)  # (correct, count)
    for s in range(0, len(xs), batch_size):
        xb, yb = xs[s:s + batch_size].to(device), ys[s:s + batch_size].to(device)
        correct[0] += (net(xb).argmax(-1) == yb).sum().item()
        correct[1] += len(yb)
    net.train(was_training)
    tot = all_reduce_sum(correct)
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


class _TrainView(nn.Module):
    """What DDP wraps: ``forward(x) -> (hidden list or [], logits)``.

    DDP only synchronises gradients of computations that go through its own ``forward``, so the
    BiDO path (``forward_with_hidden``) must be *the* forward of the wrapped module.
    """

    def __init__(self, net: nn.Module, with_hidden: bool):
        super().__init__()
        self.net = net
        self.with_hidden = with_hidden

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        if self.with_hidden:
            return self.net.forward_with_hidden(x)
        return [], self.net(x)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """Outcome of :func:`fit`. Accuracies in [0, 1]; ``history`` holds one metrics dict per epoch."""

    test_acc: float
    train_acc: float
    epochs: int
    train_loss: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def fit(ctx, model: nn.Module, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
        cfg: ClassifierTrainConfig, *, num_classes: int) -> FitResult:
    """Train ``model`` in place on this worker's shard; returns the final metrics (same on all ranks).

    ctx: a :class:`~diffmi_ray.pipeline.context.StageContext` (seed, device, checkpoints, report,
    log, check_finite). train_x/test_x: (N, C, H, W) float in [0, 1] (CPU; batches move to
    ``ctx.device``); train_y/test_y: (N,) int64 in [0, num_classes). ``model`` must start identical
    on every worker (build it after seeding with the same seed) unless a checkpoint is resumed.

    Per epoch: one pass over the shuffled train split, scheduler step, test accuracy, checkpoint,
    ``ctx.report({"epoch": e (1-based), "train_loss", "test_acc", "lr", ...})``.
    After the last epoch: train accuracy in eval mode on the (unaugmented) train split.
    """
    device = ctx.device
    rank, _ = rank_world()
    bido = cfg.bido
    net = model.to(device)
    view = wrap_ddp(_TrainView(net, bido.enabled), device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_milestones), gamma=cfg.lr_gamma)

    state = broadcast_object(ctx.load_checkpoint() if ctx.is_main else None)
    start, history = 0, []
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = int(state["epoch"]), list(state["history"])
        ctx.log(f"resuming after epoch {start}/{cfg.epochs} from the checkpoint")

    loader = sharded_loader(TensorDataset(train_x, train_y), cfg.batch_size, shuffle=True, seed=ctx.seed)
    aug_gen = torch.Generator()
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(epoch_seed(ctx.seed, rank, epoch))  # dropout
        aug_gen.manual_seed(epoch_seed(ctx.seed, rank, epoch) + 1)
        set_epoch(loader, epoch)
        view.train()
        # sums over this worker's samples: CE, BiDO dep(X,Z), dep(Z,Y) (layer means), correct, count
        sums = torch.zeros(5, dtype=torch.float64)
        for xb, yb in loader:
            xb = augment(xb, hflip=cfg.hflip, pad=cfg.random_crop_padding, generator=aug_gen).to(device)
            yb = yb.to(device)
            hidden, logits = view(xb)
            ce = F.cross_entropy(logits, yb)
            loss = ce
            n = len(yb)
            if bido.enabled and n >= 2:
                terms = bido_terms(xb, hidden, F.one_hot(yb, num_classes).float(), measure=bido.measure,
                                   sigma=bido.sigma)
                loss = ce + sum(bido.lambda_x * dxz - bido.lambda_y * dzy for dxz, dzy in terms)
                sums[1] += n * sum(float(d.detach()) for d, _ in terms) / len(terms)
                sums[2] += n * sum(float(d.detach()) for _, d in terms) / len(terms)
            ctx.check_finite("training loss", loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums[0] += n * float(ce.detach())
            sums[3] += float((logits.detach().argmax(-1) == yb).sum())
            sums[4] += n
        lr = opt.param_groups[0]["lr"]
        sched.step()
        sync_buffers(net)
        tot = all_reduce_sum(sums)
        count = max(float(tot[4]), 1.0)
        metrics = {"epoch": epoch + 1, "train_loss": float(tot[0]) / count, "train_batch_acc": float(tot[3]) / count,
                   "test_acc": accuracy(net, test_x, test_y, device=device), "lr": lr}
        if bido.enabled:
            metrics["dep_xz"] = float(tot[1]) / count
            metrics["dep_zy"] = float(tot[2]) / count
        history.append(metrics)
        ctx.save_checkpoint({"epoch": epoch + 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "history": history})
        ctx.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        ctx.report(dict(metrics))

    net.eval()
    test_acc = history[-1]["test_acc"] if history else accuracy(net, test_x, test_y, device=device)
    train_acc = accuracy(net, train_x, train_y, device=device)
    train_loss = history[-1]["train_loss"] if history else float("nan")
    return FitResult(test_acc=test_acc, train_acc=train_acc, epochs=cfg.epochs, train_loss=train_loss,
                     history=history, resumed_from=start)


__all__ = ["EVAL_BATCH", "FitResult", "accuracy", "augment", "broadcast_object", "epoch_seed", "fit", "rank_world",
           "sync_buffers"]
