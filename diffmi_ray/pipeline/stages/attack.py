"""Stage `attack`: reconstruct M images for each of the first C target classes with one method.

Works in chunks of labels and saves finished chunks as resumable state, so a killed attack resumes
where it stopped; per-sample noise is keyed by (class, repeat) so chunking does not change results.
Output ``recon.pt``: images uint8 (N, C, H, W), labels (N,), scores (N,) (T's softmax prob of the label).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffmi_ray.attacks import AttackInputs, get_attack
from diffmi_ray.pipeline.stages.split import data_config_of, load as load_split
from diffmi_ray.pipeline.stages.train_classifier import load_classifier


def run(ctx) -> dict:
    cfg = ctx.config
    split_parent = ctx.parent("split")
    data = data_config_of(split_parent)
    split = load_split(split_parent.path)
    image_shape = (data.channels, data.image_size, data.image_size)
    target = load_classifier(ctx.parent("target").path, ctx.device)
    gen = ctx.parent("generator")
    inputs = AttackInputs(
        target=target, num_classes=split.num_classes, image_shape=image_shape, generator_dir=gen.path,
        generator_config=gen.config,
        pseudo_labels_dir=ctx.parents["pseudo_labels"].path if "pseudo_labels" in ctx.parents else None,
        device=ctx.device, log=ctx.log)
    attack = get_attack(cfg["method"])(cfg["attack"], inputs)

    C, M = int(cfg["classes"]), int(cfg["images_per_class"])
    labels = torch.arange(C).repeat_interleave(M)
    chunk = max(M, int(cfg["attack"].get("batch_size", 64)) // M * M)  # whole classes per chunk
    state = ctx.load_checkpoint() or {"done": 0, "images": [], "labels": [], "scores": []}
    for start in range(int(state["done"]), len(labels), chunk):
        lab = labels[start:start + chunk]
        out = attack.invert(lab, ctx.seed)
        out.validate(image_shape)
        if not torch.equal(out.labels.cpu(), lab):
            raise ValueError(f"attack {cfg['method']} returned labels in a different order than requested")
        scores = out.scores if out.scores is not None else attack.target_scores(out.images, out.labels)
        state["images"].append(to_uint8(out.images.cpu()))
        state["labels"].append(out.labels.cpu())
        state["scores"].append(scores.detach().float().cpu())
        state["done"] = start + len(lab)
        ctx.save_checkpoint(state)
        ctx.report({"attacked": state["done"], "of": len(labels)})
        ctx.log(f"attacked {state['done']}/{len(labels)} images")

    images = torch.cat(state["images"])
    labels_out = torch.cat(state["labels"])
    scores = torch.cat(state["scores"])
    torch.save({"images": images, "labels": labels_out, "scores": scores}, ctx.out_dir / "recon.pt")
    with torch.no_grad():
        x = images.float().div(255.0).to(ctx.device)
        pred = torch.cat([target(x[s:s + 256]).argmax(-1).cpu() for s in range(0, len(x), 256)])
    return {"images": len(labels_out), "target_acc": float((pred == labels_out).float().mean()),
            "target_score": float(scores.mean())}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0,1] float -> uint8 (round to nearest)."""
    return images.clamp(0, 1).mul(255.0).round().to(torch.uint8)


def load_recon(path: Path) -> dict:
    """``recon.pt`` of a finished attack: images float (N,C,H,W) in [0,1], labels, scores."""
    d = torch.load(Path(path) / "recon.pt", map_location="cpu", weights_only=True)
    d["images"] = d["images"].float() / 255.0
    return d
