"""Stage `finetune_cdm`: Diff-MI step 1c, the target-specific fine-tuning of the pretrained CDM.

Config (:mod:`diffmi_ray.pipeline.plan`): ``{"finetune": FinetuneConfig dump without ``enabled``,
``classes`` resolved to an int, "seed"}``; parents ``prior`` (the ``train_prior`` CDM artifact),
``target`` (the ``train_classifier`` artifact of T) and ``pseudo_labels`` (its ``centroids`` are the
p-reg targets). The loop is :func:`diffmi_ray.training.finetune.run_finetune`; the runner calls
:func:`run` once per Ray Train worker (DDP) or alone.

Artifact (rank 0 writes ``ctx.out_dir``):

* ``unet.pt`` + ``model.json`` (+ ``autoencoder/`` for a latent CDM, unchanged) -- the fine-tuned U-Net in the pretrained CDM's format
  (:func:`diffmi_ray.training.cdm.save_cdm`, so :func:`diffmi_ray.training.cdm.load` reads either);
  ``model.json`` is the prior's plus ``"finetuned": true``, ``"finetune_layers"`` (the trained
  Fig. 6a indices), ``"finetune_trained"`` (parameter names), ``"finetune"`` (the config) and
  ``"finetune_acc"``.
* ``change_rates.json`` -- ``{"layers": [1..13], "change_rate": [13 floats] or null (explicit layer
  list, no probe), "selected": [indices], "names": [13 module names], "probe_steps"}``: paper Fig. 6a.
* ``history.json`` -- per-epoch ``{"epoch", "acc", "loss", "seconds"}``.
"""

from __future__ import annotations

import gc

import torch

from diffmi_ray.config.methods import FinetuneConfig
from diffmi_ray.errors import UserError
from diffmi_ray.models.unet import finetune_parameter_names, middle_block_layers
from diffmi_ray.training.finetune import ALL_LAYERS

__all__ = ["CHANGE_RATES_FILE", "HISTORY_FILE", "run", "change_rates_record"]

CHANGE_RATES_FILE = "change_rates.json"
HISTORY_FILE = "history.json"


def change_rates_record(unet, change_rate, selected, probe_steps: int | None = None) -> dict:
    """The ``change_rates.json`` dict (see the module docstring)."""
    return {"layers": list(ALL_LAYERS),
            "change_rate": None if change_rate is None else [float(r) for r in change_rate],
            "selected": [int(i) for i in selected],
            "names": [name for _, name, _ in middle_block_layers(unet)],
            "probe_steps": probe_steps if change_rate is not None else None}


def run(ctx) -> dict:
    """Fine-tune the prior CDM on the target; returns {"epochs", "final_acc", "selected_layers", ...}."""
    from diffmi_ray.pipeline.stages.pseudo_labels import load_pseudo_labels
    from diffmi_ray.pipeline.stages.train_classifier import load_classifier
    from diffmi_ray.training import cdm
    from diffmi_ray.training.finetune import run_finetune

    cfg = FinetuneConfig.model_validate(ctx.config["finetune"])
    unet, sched, meta = cdm.load(ctx.parent("prior").path, ctx.device)
    codec = cdm.load_codec(ctx.parent("prior").path, meta, ctx.device)
    target = load_classifier(ctx.parent("target").path, ctx.device)
    pl = load_pseudo_labels(ctx.parent("pseudo_labels").path)
    centroids = pl["centroids"].to(ctx.device).float() if cfg.loss_alpha > 0 else None

    where = f"{ctx.stage}/{ctx.key}"
    num_classes = int(unet.num_classes)
    target_classes = int(getattr(target, "num_classes", num_classes))
    if target_classes != num_classes:
        raise UserError(f"{where}: the CDM has {num_classes} classes, the target {target_classes}")
    classes = int(cfg.classes if cfg.classes is not None else num_classes)
    if classes > num_classes:
        raise UserError(f"{where}: finetune.classes = {classes} exceeds the model's {num_classes} classes")
    if cfg.loss_k >= target_classes:
        raise UserError(f"{where}: finetune.loss_k = {cfg.loss_k} must be < the number of classes ({target_classes})")
    if centroids is not None and centroids.shape[0] != num_classes:
        raise UserError(f"{where}: pseudo-label centroids cover {centroids.shape[0]} classes, the model {num_classes}")

    ctx.log(f"fine-tuning {meta.get('model')} on {classes} classes: layers={cfg.layers}, "
            f"{cfg.sampler_steps} DPM-Solver++ steps, w={cfg.guidance}, batch {cfg.batch_size}, "
            f"checkpointing={'on' if cfg.grad_checkpointing else 'off'}")
    res = run_finetune(unet, sched, target, centroids, cfg, ctx, num_classes=classes, codec=codec)
    ctx.log(f"done: {res.epochs} epoch(s), acc {res.final_acc:.3f} ({res.stopped}), layers {res.selected}")

    trained = finetune_parameter_names(unet, res.selected, include_label_emb=True)
    if ctx.is_main:
        out_meta = dict(meta)
        out_meta.update({"finetuned": True, "finetune_layers": res.selected, "finetune_trained": trained,
                         "finetune": cfg.model_dump(mode="json"), "finetune_acc": res.final_acc,
                         "finetune_epochs": res.epochs})
        cdm.save_cdm(ctx.out_dir, unet, out_meta, codec=codec)
        ctx.write_json(CHANGE_RATES_FILE, change_rates_record(unet, res.change_rate, res.selected,
                                                              cfg.probe_steps))
        ctx.write_json(HISTORY_FILE, res.history)
    del target
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"epochs": res.epochs, "final_acc": res.final_acc, "selected_layers": res.selected,
            "change_rate": res.change_rate, "stopped": res.stopped, "resumed_from": res.resumed_from,
            "classes": classes, "probe_seconds": round(res.probe_seconds, 3),
            "trainable_params": int(sum(p.numel() for n, p in unet.named_parameters() if n in set(trained))),
            "history": res.history}
