"""GMI's public-data GAN prior (prior kind ``gan_wgangp``) and the pieces every GAN prior shares.

GMI (Zhang et al., CVPR 2020) trains a DCGAN generator G (sigmoid output, images in [0, 1]) against a
WGAN-GP critic D on the public images only (PROTOCOL.md §4). One *iteration* here is ``n_critic``
critic steps, each on a fresh real batch, then one generator step::

    L_D = E[D(G(z))] - E[D(x)] + lambda_gp * E[(||grad_x' D(x')||_2 - 1)^2],  x' = x + a (G(z) - x), a ~ U(0, 1)
    L_G = -E[D(G(z))]

(the official loop steps G every ``n_critic``-th batch, which is the same schedule). Length:
``train.iterations`` generator steps when set, else ``epochs * (N // batch_size) // n_critic`` with N
public images (an epoch is one pass of the critic over the public set, as in the official code).

Shared with :mod:`~diffmi_ray.training.gan_kedmi` and :mod:`~diffmi_ray.training.gan_plgmi` (written
once, here): model construction from a :class:`~diffmi_ray.config.methods.GANArchConfig`, the
deterministic public-data stream, per-step random streams, gradient averaging over workers, the
resumable training loop (:func:`run_loop`), community-checkpoint loading and the artifact format.

Artifact (rank 0, ``ctx.out_dir``):

* ``generator.pt`` / ``discriminator.pt`` — bare state_dicts (no ``module.`` prefix), ``weights_only``
  loadable; ``discriminator.pt`` is absent when a community generator was loaded without a critic;
* ``model.json`` — ``{"kind", "generator": name, "generator_kwargs", "discriminator": name | null,
  "discriminator_kwargs", "num_classes", "z_dim", "image_size", "channels", "out_range",
  "conditional", "source": "trained" | {"generator": path, "discriminator": path | null}, "iterations",
  "losses": last logged losses}``.

:func:`load` rebuilds ``(G, D, meta)`` from such a folder (eval mode, frozen) for the attacks.

Distributed training (Ray Train, one call of :func:`train` per worker): the models are built from the
same seed on every worker, each worker draws its own latents and its shard of every real batch
(global batch ``batch_size`` split evenly), and gradients are averaged over workers before every
optimiser step, which is what DDP does. DDP itself is not used because a GAN step runs several
forward passes of D (real, fake, gradient-penalty interpolates through ``autograd.grad``) per
backward, which DDP's reducer does not support. Rank 0 saves checkpoints and the artifact.

Resumability: every ``checkpoint_every`` generator steps (and at the end) the models, optimisers and
step count are saved with ``ctx.save_checkpoint`` and reported with ``ctx.report``. Every random draw
of iteration i comes from a generator seeded by (seed, rank, i) and the real batches from a stream
indexed by i, so a resumed run replays exactly the iterations an uninterrupted run would have.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diffmi_ray.config.methods import GANArchConfig, GANTrainConfig, GMIPriorConfig
from diffmi_ray.conventions import resize_square
from diffmi_ray.errors import UserError
from diffmi_ray.models import create, get_info
from diffmi_ray.models.checkpoints import load_into
from diffmi_ray.models.gan_dcgan import GeneratorAPI
from diffmi_ray.training.common import is_distributed, seed_everything, unwrap

KIND = "gan_wgangp"
GEN_FILE = "generator.pt"
DIS_FILE = "discriminator.pt"
INFO_FILE = "model.json"
_GEOMETRY_KW = ("image_size", "channels", "width", "z_dim")


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def model_kwargs(name: str, *, num_classes: int, image_size: int, channels: int, width: int,
                 z_dim: int | None = None) -> dict:
    """Constructor keywords for registry model ``name``: the geometry keywords its factory takes.

    Fixed-size community models (e.g. ``gmi_generator_64``) take none; scalable ones take
    ``image_size``, ``channels``, ``width`` (and ``z_dim`` for generators). Raises UserError when the
    model cannot take the data geometry.
    """
    info = get_info(name)
    err = info.size_error(image_size, channels)
    if err:
        raise UserError(f"GAN prior: {err}")
    params = inspect.signature(info.factory).parameters
    given = {"image_size": image_size, "channels": channels, "width": width, "z_dim": z_dim}
    return {k: v for k, v in given.items() if k in params and v is not None}


def build_models(arch: GANArchConfig, *, num_classes: int, image_size: int, channels: int,
                 with_discriminator: bool = True) -> tuple[nn.Module, nn.Module | None, dict, dict]:
    """(G, D, generator kwargs, discriminator kwargs) from the architecture config.

    Raises UserError when the generator's latent size differs from ``arch.z_dim`` (a fixed-size
    community model ignores z_dim) or a model has the wrong kind.
    """
    for name, kind in ((arch.generator, "generator"), (arch.discriminator, "discriminator")):
        if get_info(name).kind != kind:
            raise UserError(f"GAN prior: '{name}' is a {get_info(name).kind}, not a {kind}")
    gkw = model_kwargs(arch.generator, num_classes=num_classes, image_size=image_size, channels=channels,
                       width=arch.width, z_dim=arch.z_dim)
    G = create(arch.generator, num_classes, **gkw)
    if int(G.z_dim) != arch.z_dim:
        raise UserError(f"GAN prior: generator '{arch.generator}' has z_dim {G.z_dim} but arch.z_dim is {arch.z_dim}")
    D, dkw = None, {}
    if with_discriminator:
        dkw = model_kwargs(arch.discriminator, num_classes=num_classes, image_size=image_size, channels=channels,
                           width=arch.width)
        D = create(arch.discriminator, num_classes, **dkw)
    return G, D, gkw, dkw


def freeze(model: nn.Module | None) -> nn.Module | None:
    """Eval mode, no parameter gradients (returns the model)."""
    if model is None:
        return None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def set_requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# data and randomness
# ----------------------------------------------------------------------------------------------


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group, or (0, 1) without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def public_images(ctx) -> Tensor:
    """The split parent's public images, float (m, C, H, W) in [0, 1] at the configured geometry."""
    from diffmi_ray.data.splits import materialize
    from diffmi_ray.pipeline.stages.split import data_config_of, load as load_split

    parent = ctx.parent("split")
    data = data_config_of(parent)
    size, ch = int(ctx.config["image_size"]), int(ctx.config["channels"])
    if (data.image_size, data.channels) != (size, ch):
        raise UserError(f"{ctx.stage}/{ctx.key}: geometry {ch}x{size}px differs from the split's "
                        f"{data.channels}x{data.image_size}px")
    x = materialize(load_split(parent.path), data, parts=("public",)).public_x
    if len(x) == 0:
        raise UserError(f"{ctx.stage}/{ctx.key}: the public set is empty; a GAN prior needs public images")
    return x


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, step, stream ...)."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) & 0x7FFFFFFFFFFFFFFF
    return h


def step_generator(seed: int, rank: int, step: int, stream: int = 0) -> torch.Generator:
    """CPU generator of the random draws (latents, labels, augmentations ...) of one iteration."""
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, rank, step, stream))
    return g


class BatchStream:
    """Batches of a tensor dataset, deterministic from (seed, stream) and the number of batches drawn.

    Epoch e visits the items in a permutation seeded by (seed, stream, e); under a process group
    worker r takes every world-th position (r, r+world, ...), so the workers' shards are disjoint.
    Batches never cross an epoch boundary (the remainder of an epoch is dropped, as ``drop_last``).
    ``seek(n)`` jumps to the state after n batches: a resumed run continues the same sequence.
    """

    def __init__(self, *tensors: Tensor, batch_size: int, seed: int, stream: int = 0):
        self.tensors = tensors
        self.n = len(tensors[0])
        self.rank, self.world = rank_world()
        self.batch = max(1, int(batch_size) // self.world)
        self.seed, self.stream = int(seed), int(stream)
        shard = len(range(self.rank, self.n, self.world))
        if shard < self.batch:  # tiny data: the whole shard is every batch
            self.batch = max(1, shard)
        self.per_epoch = max(1, shard // self.batch)
        self.count = 0
        self._epoch, self._order = -1, None

    def seek(self, count: int) -> None:
        self.count = int(count)

    def _perm(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator()
            g.manual_seed(mix_seed(self.seed, self.stream, epoch, 0x5EED))
            self._order = torch.randperm(self.n, generator=g)[self.rank::self.world]
            self._epoch = epoch
        return self._order

    def next(self) -> tuple[Tensor, ...]:
        epoch, pos = divmod(self.count, self.per_epoch)
        idx = self._perm(epoch)[pos * self.batch:(pos + 1) * self.batch]
        self.count += 1
        return tuple(t[idx] for t in self.tensors)


def total_iterations(train: GANTrainConfig, num_images: int, *, batches_per_iteration: int | None = None) -> int:
    """Generator iterations: ``train.iterations`` if set, else ``epochs * (N // batch_size) // n_critic``
    (``batches_per_iteration`` replaces n_critic when an iteration consumes another number of main batches)."""
    if train.iterations is not None:
        return int(train.iterations)
    per = batches_per_iteration or train.n_critic
    return max(1, train.epochs * max(1, num_images // train.batch_size) // per)


# ----------------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------------


def average_gradients(*models: nn.Module) -> None:
    """Average parameter gradients over workers (what DDP does; no-op without a process group)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for m in models:
        for p in m.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every worker (identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(*models: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics, spectral-norm vectors) to every worker."""
    if not is_distributed():
        return
    for m in models:
        for b in m.buffers():
            dist.broadcast(b.data, src=0)


# ----------------------------------------------------------------------------------------------
# the resumable loop
# ----------------------------------------------------------------------------------------------


def run_loop(ctx, *, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], total: int,
             step_fn: Callable[[int], dict[str, Tensor | float]], checkpoint_every: int) -> dict:
    """Run ``step_fn(i)`` for generator iterations i = start .. total-1 with checkpoints and finite checks.

    ``step_fn`` returns the iteration's losses (scalars); each is checked with ``ctx.check_finite``.
    Every ``checkpoint_every`` iterations and after the last one, rank 0 saves
    ``{"step", "models", "optimizers", "losses"}`` and every rank calls ``ctx.report({"step", "of",
    **losses})``. A saved state found at the start is restored (start = its step).

    Returns ``{"iterations": total, "resumed_from": start, "losses": last losses (floats)}``.
    """
    state = broadcast_object(ctx.load_checkpoint() if ctx.is_main else None)
    start = 0
    losses: dict[str, float] = {}
    if state is not None:
        for name, m in models.items():
            m.load_state_dict(state["models"][name])
        for name, o in optimizers.items():
            o.load_state_dict(state["optimizers"][name])
        start = int(state["step"])
        losses = dict(state.get("losses", {}))
        ctx.log(f"resumed at iteration {start}/{total}")
    log_every = max(1, total // 10)
    for i in range(start, total):
        out = step_fn(i)
        for k, v in out.items():
            ctx.check_finite(k, v)
        losses = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in out.items()}
        done = i + 1
        if done % log_every == 0 or done == total:
            ctx.log(f"iteration {done}/{total}: " + " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        if done % checkpoint_every == 0 or done == total:
            ctx.save_checkpoint({"step": done, "losses": losses,
                                 "models": {k: _cpu_state(m) for k, m in models.items()},
                                 "optimizers": {k: o.state_dict() for k, o in optimizers.items()}})
            ctx.report({"step": done, "of": total, **losses})
    return {"iterations": total, "resumed_from": start, "losses": losses}


def _cpu_state(m: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in unwrap(m).state_dict().items()}


# ----------------------------------------------------------------------------------------------
# community checkpoints, artifact
# ----------------------------------------------------------------------------------------------


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(str(path))))


def load_community(G: nn.Module, D: nn.Module | None, train: GANTrainConfig) -> dict:
    """Load ``train.generator_checkpoint`` (and ``discriminator_checkpoint`` if set) strictly.

    Accepts the community formats of :mod:`diffmi_ray.models.checkpoints` (KED-MI / GMI
    ``{'state_dict': {'module.' + k: v}}``, PLG-MI ``{'model': sd, 'opt': ...}``, raw state_dicts).
    Returns the ``source`` entry of ``model.json``.
    """
    gpath = _expand(train.generator_checkpoint)
    load_into(G, gpath, strict=True)
    dpath = None
    if train.discriminator_checkpoint:
        if D is None:
            raise UserError("discriminator_checkpoint given but no discriminator was built")
        dpath = _expand(train.discriminator_checkpoint)
        load_into(D, dpath, strict=True)
    return {"generator": str(gpath), "discriminator": str(dpath) if dpath else None}


def write_artifact(ctx, *, kind: str, arch: GANArchConfig, G: nn.Module, D: nn.Module | None, gkw: dict, dkw: dict,
                   num_classes: int, source, extra: dict | None = None) -> dict:
    """Rank 0 writes ``generator.pt``, ``discriminator.pt`` (if D) and ``model.json``; returns the info dict."""
    G, D = unwrap(G), unwrap(D) if D is not None else None
    info = {
        "kind": kind, "generator": arch.generator, "generator_kwargs": gkw,
        "discriminator": arch.discriminator if D is not None else None,
        "discriminator_kwargs": dkw if D is not None else {}, "num_classes": int(num_classes),
        "z_dim": int(G.z_dim), "image_size": int(G.image_size), "channels": int(G.channels),
        "out_range": G.out_range, "conditional": bool(G.conditional), "source": source, **(extra or {}),
    }
    if ctx.is_main:
        torch.save(_cpu_state(G), ctx.out_dir / GEN_FILE)
        if D is not None:
            torch.save(_cpu_state(D), ctx.out_dir / DIS_FILE)
        (ctx.out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return info


def from_community(ctx, *, kind: str, arch: GANArchConfig, train: GANTrainConfig, G: nn.Module, D: nn.Module | None,
                   gkw: dict, dkw: dict, num_classes: int, extra: dict | None = None) -> dict | None:
    """The ``train.generator_checkpoint`` path shared by the three GAN priors.

    Loads the community weights into G (and into D only when ``train.discriminator_checkpoint`` is
    given; otherwise the artifact has no discriminator and an attack that needs one says so), writes
    the artifact and returns the stage metrics. Returns None, doing nothing, when there is no
    checkpoint (the caller trains).
    """
    if not train.generator_checkpoint:
        return None
    if not train.discriminator_checkpoint:
        D = None
    source = load_community(G, D, train)
    write_artifact(ctx, kind=kind, arch=arch, G=G, D=D, gkw=gkw, dkw=dkw, num_classes=num_classes, source=source,
                   extra={"iterations": 0, **(extra or {})})
    ctx.log(f"loaded community GAN {source}")
    return {"source": "checkpoint", "iterations": 0}


def prior_info(path: str | os.PathLike) -> dict:
    """The ``model.json`` of a finished GAN ``train_prior`` artifact folder."""
    p = Path(path) / INFO_FILE
    if not p.is_file():
        raise UserError(f"{Path(path)}: not a GAN prior artifact ({INFO_FILE} missing)")
    return json.loads(p.read_text())


class ResizedGenerator(GeneratorAPI, nn.Module):
    """A generator whose images, as :meth:`to_unit` returns them, come out at ``size`` px.

    ``forward`` is G's own (native size and range: what a discriminator judges); ``to_unit`` maps to
    [0, 1] and resizes (:func:`~diffmi_ray.conventions.resize_square`), which every attack applies
    before T sees an image. Used for a GAN trained at ``arch.image_size`` != the data's size.
    """

    def __init__(self, G: nn.Module, size: int):
        super().__init__()
        self.G = G
        self.z_dim, self.out_range, self.conditional = G.z_dim, G.out_range, G.conditional
        self.num_classes, self.channels, self.image_size = G.num_classes, G.channels, int(size)

    def forward(self, *args, **kwargs):
        return self.G(*args, **kwargs)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return resize_square(self.G.to_unit(x), self.image_size)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module | None, dict]:
    """``(G, D, meta)`` of a finished GAN prior artifact (any of the three GAN kinds).

    G and D are in eval mode with frozen parameters, on ``device``; D is None when the artifact has no
    discriminator. ``meta`` is the ``model.json`` dict. G follows the generator contract of
    :class:`diffmi_ray.models.gan_dcgan.GeneratorAPI` (``z_dim``, ``out_range``, ``to_unit`` ...); a
    GAN trained at another size than the data's (``meta["output_size"]``) comes wrapped in
    :class:`ResizedGenerator`.
    """
    info = prior_info(path)
    dev = torch.device(device) if isinstance(device, str) else device
    n = int(info["num_classes"])
    G = create(info["generator"], n, **info["generator_kwargs"])
    G.load_state_dict(torch.load(Path(path) / GEN_FILE, map_location="cpu", weights_only=True))
    D = None
    if info.get("discriminator"):
        D = create(info["discriminator"], n, **info["discriminator_kwargs"])
        D.load_state_dict(torch.load(Path(path) / DIS_FILE, map_location="cpu", weights_only=True))
        D = freeze(D).to(dev)
    G = freeze(G).to(dev)
    out = int(info.get("output_size") or info["image_size"])
    if out != int(info["image_size"]):
        G = ResizedGenerator(G, out)
    return G, D, info


# ----------------------------------------------------------------------------------------------
# GMI training
# ----------------------------------------------------------------------------------------------


def gradient_penalty(D: nn.Module, real: Tensor, fake: Tensor, alpha: Tensor) -> Tensor:
    """WGAN-GP penalty E[(||grad D(x')||_2 - 1)^2] at x' = real + alpha (fake - real); alpha (B, 1, 1, 1)."""
    x = (real + alpha * (fake - real)).detach().requires_grad_(True)
    out = D(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((g.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def train(ctx) -> dict:
    """Train (or load) GMI's GAN prior; rank 0 writes the artifact. Returns metrics for the record."""
    cfg = GMIPriorConfig.model_validate(ctx.config["prior"])
    size, ch = int(ctx.config["image_size"]), int(ctx.config["channels"])
    gan_size = int(cfg.arch.image_size or size)  # the GAN's own size; attacks resize to `size`
    seed_everything(ctx.seed, rank=0)  # identical initial weights on every worker
    G, D, gkw, dkw = build_models(cfg.arch, num_classes=0, image_size=gan_size, channels=ch,
                                  with_discriminator=True)
    sizes = {"output_size": size}
    tc = cfg.train
    done = from_community(ctx, kind=KIND, arch=cfg.arch, train=tc, G=G, D=D, gkw=gkw, dkw=dkw, num_classes=0,
                          extra=sizes)  # GMI's attack needs D; VMI / PPA only use G
    if done is not None:
        return done

    dev = ctx.device
    G, D = G.to(dev).train(), D.to(dev).train()
    x_pub = public_images(ctx)
    if gan_size != size:
        x_pub = torch.cat([resize_square(x_pub[i:i + 256], gan_size) for i in range(0, len(x_pub), 256)])
        ctx.log(f"public images resized {size} -> {gan_size} px for the GAN (attacks resize back)")
    stream = BatchStream(x_pub, batch_size=tc.batch_size, seed=ctx.seed)
    total = total_iterations(tc, len(x_pub))
    opt_g = torch.optim.Adam(G.parameters(), lr=tc.lr, betas=tuple(tc.betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=tc.lr, betas=tuple(tc.betas))

    def step(i: int) -> dict:
        g = step_generator(ctx.seed, ctx.rank, i)
        stream.seek(i * tc.n_critic)
        set_requires_grad(G, False)
        set_requires_grad(D, True)
        for _ in range(tc.n_critic):
            (real,) = stream.next()
            real = real.to(dev)
            b = len(real)
            with torch.no_grad():
                fake = G(torch.randn(b, G.z_dim, generator=g).to(dev))
            wd = D(real).mean() - D(fake).mean()  # Wasserstein-1 estimate
            gp = gradient_penalty(D, real, fake, torch.rand(b, 1, 1, 1, generator=g).to(dev))
            loss_d = -wd + cfg.lambda_gp * gp
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            average_gradients(D)
            opt_d.step()
        set_requires_grad(D, False)
        set_requires_grad(G, True)
        loss_g = -D(G(torch.randn(stream.batch, G.z_dim, generator=g).to(dev))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        average_gradients(G)
        opt_g.step()
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "wasserstein": wd.detach(), "gp": gp.detach()}

    res = run_loop(ctx, models={"G": G, "D": D}, optimizers={"G": opt_g, "D": opt_d}, total=total, step_fn=step,
                   checkpoint_every=tc.checkpoint_every)
    sync_buffers(G, D)
    write_artifact(ctx, kind=KIND, arch=cfg.arch, G=G, D=D, gkw=gkw, dkw=dkw, num_classes=0, source="trained",
                   extra={"iterations": total, "losses": res["losses"], **sizes})
    return {"source": "trained", "iterations": total, "resumed_from": res["resumed_from"],
            "public_images": len(x_pub), **res["losses"]}


__all__ = ["BatchStream", "DIS_FILE", "GEN_FILE", "INFO_FILE", "KIND", "ResizedGenerator", "average_gradients",
           "build_models", "freeze", "from_community", "gradient_penalty", "load", "load_community", "model_kwargs",
           "prior_info", "public_images", "run_loop", "step_generator", "sync_buffers", "total_iterations", "train",
           "write_artifact"]
