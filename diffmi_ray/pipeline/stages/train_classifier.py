"""Stage `train_classifier`: the target classifier T or the evaluation classifier E on the private split.

Config (see :mod:`diffmi_ray.pipeline.plan`): ``{"classifier": ClassifierConfig dump, "image_size",
"channels", "seed"}``; parent role ``"split"``.

The classifier is either loaded from a community checkpoint (``classifier.checkpoint``: KED-MI format
``{'state_dict': {'module.' + name: tensor}}`` or a raw state_dict; its class count must equal the
private split's) or trained with :func:`diffmi_ray.training.classifier.fit` (resumable, DDP-ready:
the runner calls :func:`run` once per Ray Train worker). Either way its accuracy on the private test
split is measured and recorded.

Artifact (written by rank 0 into ``ctx.out_dir``):

* ``model.pt`` — the bare ``state_dict`` (no ``module.`` prefix), loadable with ``weights_only=True``;
* ``model.json`` — ``{"model": registry name, "kwargs": constructor keywords incl. in_channels,
  "num_classes": C, "image_size", "channels", "test_acc", "train_acc", "source": "trained" | path,
  "history": per-epoch metrics}``.

:func:`load_classifier` rebuilds the frozen model from such a folder (pseudo-labels, attacks, evaluation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from diffmi_ray.config.classifier import ClassifierConfig
from diffmi_ray.data.splits import materialize
from diffmi_ray.errors import UserError
from diffmi_ray.models import create, get_info
from diffmi_ray.models.checkpoints import compare_state_dict, load_state_dict_file
from diffmi_ray.pipeline.stages.split import data_config_for, load as load_split
from diffmi_ray.training.classifier import accuracy, fit
from diffmi_ray.training.common import seed_everything

MODEL_FILE = "model.pt"
INFO_FILE = "model.json"


def model_kwargs(cfg: ClassifierConfig, image_size: int, channels: int) -> dict:
    """Constructor keywords of the classifier: ``model_kwargs`` plus the data geometry.

    The geometry keywords the registry entry declares (``extra['data_kwargs']``, normally
    ``in_channels`` and ``image_size``) are filled from the split unless ``model_kwargs`` sets them.
    ``pretrained`` is not included (it only matters for the initialisation of a training run).
    """
    info = get_info(cfg.model)
    geometry = {"in_channels": int(channels), "image_size": int(image_size)}
    data_kw = info.extra.get("data_kwargs", ("in_channels",))
    kw = {k: v for k, v in geometry.items() if k in data_kw}
    kw.update(cfg.model_kwargs)
    kw.pop("pretrained", None)
    return kw


def _head_key(model: nn.Module) -> str | None:
    """state_dict name of the final linear layer's weight (num_classes, feature_dim), if the model has one."""
    head = getattr(model, "head", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        return None
    return next((n for n, p in model.named_parameters() if p is weight), None)


def load_community_checkpoint(model: nn.Module, path: str | os.PathLike, num_classes: int) -> None:
    """Load a community checkpoint into ``model`` (strict names and shapes), checking the class count first.

    Raises UserError naming the file when its class count differs from ``num_classes`` (the private
    split's) or when any key or shape does not fit.
    """
    path = Path(os.path.expanduser(str(path)))
    sd = load_state_dict_file(path)
    hk = _head_key(model)
    if hk is not None and hk in sd and sd[hk].dim() >= 1 and int(sd[hk].shape[0]) != num_classes:
        raise UserError(f"{path}: the classifier checkpoint has {int(sd[hk].shape[0])} classes (its '{hk}' is "
                        f"{list(sd[hk].shape)}) but the private split has {num_classes} classes; use the "
                        f"checkpoint with the data it was trained on (same private classes) or train instead "
                        f"(classifier.checkpoint: null)")
    rep = compare_state_dict(model, sd)
    if not rep.ok:
        raise UserError(f"{path}: does not fit {type(model).__name__}: {rep.describe()}")
    model.load_state_dict(sd, strict=False)  # strict=False only for a missing BN num_batches_tracked


def run(ctx) -> dict:
    """Train (or load) the classifier; rank 0 writes ``model.pt`` and ``model.json``.

    Returns ``{"test_acc", "train_acc", "epochs", "source"}`` (accuracies in [0, 1]; ``train_loss``
    and ``resumed_from`` when trained).
    """
    cfg = ClassifierConfig.model_validate(ctx.config["classifier"])
    image_size, channels = int(ctx.config["image_size"]), int(ctx.config["channels"])
    parent = ctx.parent("split")
    data = data_config_for(ctx, parent)
    split = load_split(parent.path)
    tensors = materialize(split, data, parts=("train", "test"))
    num_classes = split.num_classes

    kwargs = model_kwargs(cfg, image_size, channels)
    seed_everything(ctx.seed, rank=0)  # identical initial weights on every worker
    pretrained = {"pretrained": True} if cfg.train.pretrained and not cfg.checkpoint else {}
    model = create(cfg.model, num_classes, **kwargs, **pretrained)

    if cfg.checkpoint:
        load_community_checkpoint(model, cfg.checkpoint, num_classes)
        model = model.to(ctx.device).eval()
        test_acc = accuracy(model, tensors.test_x, tensors.test_y, device=ctx.device)
        train_acc = accuracy(model, tensors.train_x, tensors.train_y, device=ctx.device)
        ctx.log(f"loaded {cfg.checkpoint}: test_acc={test_acc:.4f} train_acc={train_acc:.4f}")
        result = {"test_acc": test_acc, "train_acc": train_acc, "epochs": 0, "source": str(cfg.checkpoint)}
        history: list[dict] = []
    else:
        res = fit(ctx, model, tensors.train_x, tensors.train_y, tensors.test_x, tensors.test_y, cfg.train,
                  num_classes=num_classes)
        ctx.log(f"trained {cfg.model}: test_acc={res.test_acc:.4f} train_acc={res.train_acc:.4f}")
        result = {"test_acc": res.test_acc, "train_acc": res.train_acc, "epochs": res.epochs, "source": "trained",
                  "train_loss": res.train_loss, "resumed_from": res.resumed_from}
        history = res.history

    if ctx.is_main:
        net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(sd, ctx.out_dir / MODEL_FILE)
        info = {"model": cfg.model, "kwargs": kwargs, "num_classes": num_classes, "image_size": image_size,
                "channels": channels, "test_acc": result["test_acc"], "train_acc": result["train_acc"],
                "source": result["source"], "history": history}
        (ctx.out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    return result


def classifier_info(path: str | os.PathLike) -> dict:
    """The ``model.json`` of a finished `train_classifier` artifact folder."""
    p = Path(path) / INFO_FILE
    if not p.is_file():
        raise UserError(f"{Path(path)}: not a train_classifier artifact ({INFO_FILE} missing)")
    return json.loads(p.read_text())


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The classifier stored in a finished `train_classifier` artifact folder, ready to query.

    Rebuilt from ``model.json``, weights from ``model.pt`` (``weights_only=True``); returned in eval
    mode with every parameter's ``requires_grad`` False, on ``device``. Input (B, C, H, W) in [0, 1],
    output logits (B, num_classes).
    """
    info = classifier_info(path)
    model = create(info["model"], int(info["num_classes"]), **info["kwargs"])
    sd = torch.load(Path(path) / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(torch.device(device) if isinstance(device, str) else device)


__all__ = ["INFO_FILE", "MODEL_FILE", "classifier_info", "load_classifier", "load_community_checkpoint",
           "model_kwargs", "run"]
