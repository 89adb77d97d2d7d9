"""Diff-MI step 1b: pretrain the class-conditional diffusion model (CDM) on pseudo-labelled public data.

Per-worker loop for the ``train_prior`` stage with ``kind: cdm`` (:mod:`diffmi_ray.pipeline.stages.train_prior`
dispatches here): :func:`train` runs once per Ray Train worker (DDP, gloo on CPU / nccl on GPU) or
alone in one process. Paper eq. 2 / PROTOCOL.md §3::

    L_Pretrain = E_{x0, y_p, eps ~ N(0, I), t ~ U{0..T-1}} || eps - eps_theta(x_t, y_p, t) ||^2
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps

Data: the public images selected by the top-n pseudo-labelling (each with the class it was selected
for; an image selected for two classes appears twice), or with ``use_all_public`` every public
image with its top-1 pseudo-label. Images go to [-1, 1] after U(0, 1/256) dequantisation
(``(255 x + u) / 256``, u ~ U(0, 1), x in [0, 1]) and an optional random horizontal flip.
Classifier-free guidance training: with probability ``null_prob`` the WHOLE global batch of a step
gets the null label (= num_classes), as in the official code (one coin per step, not per sample).
AdamW, EMA of the weights (the EMA weights are the artifact).

Randomness and resuming: step s draws its global batch (positions without replacement) and its
null-label coin from a generator keyed by (seed, s), identical on every worker; each worker takes its
slice of the global batch and draws its own t, eps, dequantisation and flips from a generator keyed
by (seed, s, rank). No RNG state is saved: a run resumed from the checkpoint of step k replays
exactly the steps k+1.. of an uninterrupted run. Checkpoints (model, EMA, optimiser, step) are
written every ``checkpoint_every`` steps with ``ctx.save_checkpoint`` and ``ctx.report`` is called
right after each one.

Latent diffusion (``prior.latent``, paper Table VI): the public images are encoded once by the
first-stage autoencoder (:class:`~diffmi_ray.models.autoencoder.LatentCodec`; pretrained, or built
from ``latent.arch`` and trained here first by :mod:`diffmi_ray.training.autoencoder`), and the CDM
learns the same loss on the scaled latents ``z * s`` instead of [-1, 1] pixels. No dequantisation
(latents are continuous); the flip is applied to the image before encoding (both the images and
their mirror images are encoded, each selected image once). ``s`` is ``latent.scaling_factor`` or
1 / std of the latents of the selected images. The trained autoencoder and ``s`` are part of every checkpoint, so a resumed run does not
retrain it.

``checkpoint: PATH`` skips training and loads the Diff-MI authors' released CDM (a raw state_dict of
``diffmi_unet_64``: 64 px RGB, label embedding of num_classes + 1 rows).

Artifact (rank 0 writes ``ctx.out_dir``), read back by :func:`load`:

* ``unet.pt`` — bare state_dict of the EMA U-Net (no ``module.`` prefix), ``weights_only`` loadable;
* ``model.json`` — ``{"model": registry name, "kwargs": constructor keywords, "num_classes",
  "image_size", "channels", "diffusion": {"steps", "beta_start", "beta_end"}, ...}``; image_size and
  channels are the U-Net's (the latent's in latent mode); latent mode adds ``"latent"``
  (:meth:`LatentCodec.meta` plus ``data_image_size``, the size decoded images are resized to);
* ``autoencoder/`` (latent mode only) — the first-stage autoencoder (diffusers ``save_pretrained``).

:func:`save_cdm` writes the same two files for any U-Net (the fine-tuning stage uses it).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from diffmi_ray.config.methods import CDMPriorConfig, UNetConfig
from diffmi_ray.conventions import null_class, sample_generator, to_pm1
from diffmi_ray.diffusion import Schedule, eps_loss, linear_schedule
from diffmi_ray.errors import UserError
from diffmi_ray.models import create
from diffmi_ray.training.common import EMA, is_distributed, seed_everything, unwrap, wrap_ddp

__all__ = ["MODEL_FILE", "INFO_FILE", "unet_kwargs", "build_unet", "save_cdm", "schedule_of", "load", "load_codec",
           "null_batch", "dequantize", "train"]

MODEL_FILE = "unet.pt"
INFO_FILE = "model.json"
PAPER_MODEL = "diffmi_unet_64"  # the authors' released CDM layout


# ----------------------------------------------------------------------------------------------
# model construction, saving and loading


def _norm_groups(widths: list[int], preferred: int = 32) -> int:
    """GroupNorm groups: guided-diffusion's 32 when every width allows it, else the largest divisor."""
    return math.gcd(preferred, *widths)


def unet_kwargs(cfg: UNetConfig, image_size: int, channels: int) -> dict:
    """Constructor keywords of ``create(cfg.model, num_classes, **kw)`` for the data geometry.

    ``diffmi_unet_64`` has a fixed layout (64 px RGB; only dropout is free). For ``cdm_unet`` every
    UNetConfig field is passed; GroupNorm uses 32 groups when all widths are multiples of 32
    (guided-diffusion), else the largest common divisor (small CPU-scale widths such as 8 or 16).
    """
    if cfg.model == PAPER_MODEL:
        if (image_size, channels) != (64, 3):
            raise UserError(f"unet.model '{PAPER_MODEL}' takes 64 px RGB images, the data is "
                            f"{channels}x{image_size} px; use unet.model 'cdm_unet'")
        return {"dropout": cfg.dropout}
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    return {"image_size": int(image_size), "in_channels": int(channels), "model_channels": cfg.model_channels,
            "channel_mult": list(cfg.channel_mult), "num_res_blocks": cfg.num_res_blocks,
            "attention_resolutions": list(cfg.attention_resolutions), "num_heads": cfg.num_heads,
            "dropout": cfg.dropout, "norm_groups": _norm_groups(widths)}


def build_unet(meta: dict) -> torch.nn.Module:
    """A freshly initialised U-Net from a ``model.json`` dict (keys model, kwargs, num_classes)."""
    return create(meta["model"], int(meta["num_classes"]), **meta.get("kwargs", {}))


def save_cdm(out_dir: str | Path, unet: torch.nn.Module, meta: dict, codec=None) -> None:
    """Write ``unet.pt`` (bare state_dict on the CPU) and ``model.json`` (``meta``) into ``out_dir``.

    ``meta`` needs at least model, kwargs, num_classes, image_size, channels and diffusion
    ({steps, beta_start, beta_end}); extra keys (e.g. provenance) are kept. A latent CDM passes its
    :class:`~diffmi_ray.models.autoencoder.LatentCodec` (saved to ``autoencoder/``; meta must hold "latent").
    """
    missing = [k for k in ("model", "kwargs", "num_classes", "image_size", "channels", "diffusion") if k not in meta]
    if missing:
        raise ValueError(f"save_cdm: meta lacks {missing}")
    if (codec is None) != ("latent" not in meta):
        raise ValueError("save_cdm: a latent CDM needs both its codec and meta['latent']")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().clone() for k, v in unwrap(unet).state_dict().items()}
    torch.save(sd, out / MODEL_FILE)
    if codec is not None:
        codec.save(out)
    (out / INFO_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def schedule_of(meta: dict) -> Schedule:
    """The linear noise schedule recorded in a ``model.json`` dict."""
    d = meta["diffusion"]
    return linear_schedule(int(d["steps"]), float(d["beta_start"]), float(d["beta_end"]))


def load(path: str | Path, device: str | torch.device = "cpu", trainable: bool = False
         ) -> tuple[torch.nn.Module, Schedule, dict]:
    """(U-Net in eval mode on ``device``, its noise schedule, the ``model.json`` dict) of a CDM folder.

    Works for ``train_prior`` (kind cdm) and ``finetune_cdm`` artifacts (both written by
    :func:`save_cdm`). Parameters get ``requires_grad = trainable`` (False: a frozen prior, what the
    attack wants; fine-tuning passes True or unfreezes the layers it trains).
    """
    p = Path(path)
    info = p / INFO_FILE
    if not info.is_file():
        raise UserError(f"{p}: not a CDM artifact ({INFO_FILE} missing)")
    meta = json.loads(info.read_text())
    unet = build_unet(meta)
    sd = torch.load(p / MODEL_FILE, map_location="cpu", weights_only=True)
    unet.load_state_dict(sd)
    unet.eval()
    for prm in unet.parameters():
        prm.requires_grad_(trainable)
    dev = torch.device(device) if isinstance(device, str) else device
    return unet.to(dev), schedule_of(meta), meta


def load_codec(path: str | Path, meta: dict, device: str | torch.device = "cpu"):
    """The frozen :class:`~diffmi_ray.models.autoencoder.LatentCodec` of a latent CDM artifact, else None."""
    if "latent" not in meta:
        return None
    from diffmi_ray.models.autoencoder import LatentCodec

    return LatentCodec.load(path, meta["latent"], device)


# ----------------------------------------------------------------------------------------------
# training pieces (pure, tested)


def null_batch(seed: int, step: int, p: float) -> bool:
    """Whether step ``step`` trains the whole batch on the null label (probability p, seeded by (seed, step))."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    g = sample_generator(seed, 0x4E55, step)
    return bool(torch.rand((), generator=g).item() < p)


def dequantize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U(0, 1/256) dequantisation of [0, 1] images: (255 x + u) / 256 with u ~ U(0, 1); stays in [0, 1]."""
    u = torch.rand(x.shape, generator=generator)
    return (x * 255.0 + u.to(x)) / 256.0


def _global_batch(seed: int, step: int, n: int, batch: int) -> torch.Tensor:
    """Positions of step ``step``'s global batch: without replacement (with it if batch > n)."""
    g = sample_generator(seed, 0xBA7C, step)
    if batch <= n:
        return torch.randperm(n, generator=g)[:batch]
    return torch.randint(n, (batch,), generator=g)


def _world() -> tuple[int, int]:
    if is_distributed():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------------
# the stage


def _meta(cfg: CDMPriorConfig, model: str, kwargs: dict, num_classes: int, image_size: int, channels: int,
          **extra) -> dict:
    return {"model": model, "kwargs": kwargs, "num_classes": int(num_classes), "image_size": int(image_size),
            "channels": int(channels), "null_label": null_class(num_classes),
            "diffusion": cfg.diffusion.model_dump(mode="json"), **extra}


def _load_released(ctx, cfg: CDMPriorConfig, num_classes: int, image_size: int, channels: int) -> dict:
    """``checkpoint`` option: the authors' CDM (raw ``diffmi_unet_64`` state_dict) becomes the artifact."""
    from diffmi_ray.models.checkpoints import compare_state_dict, load_state_dict_file

    if (image_size, channels) != (64, 3):
        raise UserError(f"prior.checkpoint: the released Diff-MI CDM takes 64 px RGB images; the data is "
                        f"{channels}x{image_size} px")
    sd = load_state_dict_file(Path(cfg.checkpoint).expanduser())
    emb = sd.get("label_emb.weight")
    if emb is None:
        raise UserError(f"{cfg.checkpoint}: no label_emb.weight; not a class-conditional Diff-MI CDM")
    file_classes = int(emb.shape[0]) - 1
    if file_classes != num_classes:
        raise UserError(f"{cfg.checkpoint}: the CDM has {file_classes} classes (+1 null row) but the private "
                        f"split has {num_classes}")
    unet = create(PAPER_MODEL, num_classes)
    rep = compare_state_dict(unet, sd)
    if not rep.ok:
        raise UserError(f"{cfg.checkpoint}: does not fit {PAPER_MODEL}: {rep.describe()}")
    unet.load_state_dict(sd)
    if ctx.is_main:
        save_cdm(ctx.out_dir, unet, _meta(cfg, PAPER_MODEL, {}, num_classes, image_size, channels,
                                          source=str(cfg.checkpoint)))
    ctx.log(f"loaded the released CDM {cfg.checkpoint}")
    return {"steps": 0, "source": str(cfg.checkpoint)}


def _prepare_latents(ctx, cfg: CDMPriorConfig, images, channels: int, data_size: int, state: dict | None):
    """Latent mode: (codec, latents of images, latents of the mirrored images or None, info dict).

    ``images``: a :class:`~diffmi_ray.data.splits.LazyImages` (encoded chunk by chunk, never held
    whole) or a tensor. The autoencoder is the pretrained one, the one in a resumed checkpoint, or
    trained here (which loads the images: CPU scale).
    """
    from diffmi_ray.models.autoencoder import LatentCodec, build_autoencoder, downsample_factor, load_pretrained
    from diffmi_ray.training.autoencoder import train_autoencoder

    lat = cfg.latent
    size = lat.image_size or data_size
    info: dict = {}
    if lat.pretrained:
        ae = load_pretrained(lat)
        if int(ae.config.in_channels) != channels:
            raise UserError(f"prior.latent.pretrained {lat.pretrained!r} takes {ae.config.in_channels}-channel "
                            f"images; the data has {channels}")
    else:
        seed_everything(ctx.seed, rank=0)
        ae = build_autoencoder(lat, channels, size)
        if state is not None and "autoencoder" in state:
            ae.load_state_dict(state["autoencoder"])
            info["autoencoder"] = "from checkpoint"
        else:
            ctx.log(f"training the autoencoder ({sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M params, "
                    f"f={downsample_factor(lat.arch.block_out_channels)}) for {lat.iterations} steps")
            if not isinstance(images, torch.Tensor):
                images = images.load()  # CPU scale: loaded once, for the training and the encoding below
            info["autoencoder"] = train_autoencoder(ae, images, lat, seed=ctx.seed, device=ctx.device, log=ctx.log)
    codec = LatentCodec(ae, size, 1.0, output_size=data_size).to(ctx.device)
    z, z_flip = codec.encode_all(images, lat.encode_batch_size, ctx.device, mirrored=cfg.hflip)
    if lat.scaling_factor is not None:
        scale = float(lat.scaling_factor)
    elif state is not None and "scaling_factor" in state:
        scale = float(state["scaling_factor"])
    else:
        scale = 1.0 / max(float(z.float().std()), 1e-8)
    codec.scaling_factor = scale
    z = z * scale
    z_flip = z_flip * scale if z_flip is not None else None
    ctx.log(f"latent space {tuple(z.shape[1:])} (x{codec.downsample} down from {size} px), scale {scale:.5g}")
    return codec, z, z_flip, info


def train(ctx) -> dict:
    """Pretrain (or load) the CDM; rank 0 writes ``unet.pt`` + ``model.json``.

    Config: ``{"kind": "cdm", "prior": CDMPriorConfig dump, "image_size", "channels", "seed"}``;
    parents ``split`` and ``pseudo_labels``. Returns {"steps", "loss" (mean of the last steps),
    "resumed_from", "params", "seconds_per_step", "examples"} (or {"steps": 0, "source"} when loading).
    """
    from diffmi_ray.data.splits import public_images
    from diffmi_ray.pipeline.stages.pseudo_labels import load_pseudo_labels, training_pairs
    from diffmi_ray.pipeline.stages.split import data_config_for, load as load_split

    cfg = CDMPriorConfig.model_validate(ctx.config["prior"])
    image_size, channels = int(ctx.config["image_size"]), int(ctx.config["channels"])
    split_parent = ctx.parent("split")
    data = data_config_for(ctx, split_parent)
    split = load_split(split_parent.path)
    num_classes = split.num_classes
    if cfg.checkpoint:
        return _load_released(ctx, cfg, num_classes, image_size, channels)

    # ---- data: pseudo-labelled public images, kept in [0, 1] on the CPU
    pl = load_pseudo_labels(ctx.parent("pseudo_labels").path)
    pos, labels = training_pairs(pl, cfg.use_all_public)
    n = len(pos)  # training pairs (an image selected for two classes counts twice)
    # only the selected images are loaded, each once; its pairs share it
    uniq, inv = torch.unique(torch.as_tensor(pos), return_inverse=True)
    selected = public_images(split, data)[uniq]  # lazy: loaded in chunks when used
    images = selected.load()[inv] if cfg.latent is None else selected  # (N, C, H, W) in pixel mode

    state = ctx.load_checkpoint()

    # ---- latent mode: the autoencoder and the training latents
    codec, latents, latents_flip, latent_info = None, None, None, {}
    unet_size, unet_channels = image_size, channels
    if cfg.latent is not None:
        codec, latents, latents_flip, latent_info = _prepare_latents(ctx, cfg, images, channels, image_size, state)
        latents = latents[inv]
        latents_flip = latents_flip[inv] if latents_flip is not None else None
        images = None  # only the latents are used from here on
        unet_channels, unet_size = codec.latent_shape[0], codec.latent_size

    # ---- model, EMA, optimiser (identical initial weights on every worker)
    seed_everything(ctx.seed, rank=0)
    kwargs = unet_kwargs(cfg.unet, unet_size, unet_channels)
    unet = create(cfg.unet.model, num_classes, **kwargs)
    rank, world = _world()
    model = wrap_ddp(unet, ctx.device)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(unwrap(model).parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = linear_schedule(cfg.diffusion.steps, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
    T, null = sched.num_timesteps, null_class(num_classes)
    params = sum(p.numel() for p in unet.parameters())

    def checkpoint_state(step: int) -> dict:
        out = {"step": step, "model": unwrap(model).state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}
        if codec is not None:
            out["scaling_factor"] = codec.scaling_factor
            if cfg.latent.pretrained is None:
                out["autoencoder"] = {k: v.detach().cpu() for k, v in codec.ae.state_dict().items()}
        return out

    start = 0
    if state is None and codec is not None and cfg.latent.pretrained is None:
        ctx.save_checkpoint(checkpoint_state(0))  # the trained autoencoder survives an interruption
    if state is not None and int(state["step"]) > 0:
        unwrap(model).load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        ctx.log(f"resumed from step {start}")
    ema.shadow.to(ctx.device)

    per_worker = max(1, cfg.batch_size // world)
    ctx.log(f"CDM {cfg.unet.model} ({params / 1e6:.2f}M params) on {n} pseudo-labelled public images, "
            f"{cfg.iterations} steps, batch {per_worker} x {world} worker(s)")
    model.train()
    recent: list[float] = []
    log_every = max(1, cfg.iterations // 10)
    t0 = time.time()
    for step in range(start + 1, cfg.iterations + 1):
        idx = _global_batch(ctx.seed, step, n, per_worker * world)[rank * per_worker:(rank + 1) * per_worker]
        g = sample_generator(ctx.seed, 0x57E9, step, rank)
        if codec is not None:  # scaled latents; the flip happened before encoding
            x0 = latents[idx]
            if cfg.hflip:
                flip = torch.rand(len(x0), generator=g) < 0.5
                x0 = torch.where(flip.view(-1, 1, 1, 1), latents_flip[idx], x0)
        else:
            x = images[idx]
            if cfg.dequantize:
                x = dequantize(x, g)
            if cfg.hflip:
                flip = torch.rand(len(x), generator=g) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            x0 = to_pm1(x)
        y = torch.full((len(x0),), null) if null_batch(ctx.seed, step, cfg.null_prob) else labels[idx]
        t = torch.randint(T, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x0 = x0.to(ctx.device)
        loss = eps_loss(model, sched, x0, y.to(ctx.device), t.to(ctx.device), noise.to(ctx.device))
        ctx.check_finite("CDM loss", loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        recent = (recent + [float(loss.detach())])[-50:]
        if step % log_every == 0 or step == cfg.iterations:
            ctx.log(f"step {step}/{cfg.iterations} loss {sum(recent) / len(recent):.4f} "
                    f"({(time.time() - t0) / (step - start):.2f} s/step)")
        if step % cfg.checkpoint_every == 0 and step < cfg.iterations:
            ctx.save_checkpoint(checkpoint_state(step))
            ctx.report({"step": step, "loss": sum(recent) / len(recent)})

    steps_run = cfg.iterations - start
    if ctx.is_main:
        extra = {}
        if codec is not None:
            extra["latent"] = {**codec.meta(), "pretrained": cfg.latent.pretrained, "subfolder": cfg.latent.subfolder}
        save_cdm(ctx.out_dir, ema.shadow, _meta(cfg, cfg.unet.model, kwargs, num_classes, unet_size, unet_channels,
                                                  source="trained", steps=cfg.iterations, examples=n, **extra),
                 codec=codec)
    return {"steps": cfg.iterations, "loss": (sum(recent) / len(recent)) if recent else None,
            "resumed_from": start, "params": params, "examples": n, **latent_info,
            "seconds_per_step": (time.time() - t0) / steps_run if steps_run else 0.0}
