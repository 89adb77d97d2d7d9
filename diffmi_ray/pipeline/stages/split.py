"""Stage `split`: the deterministic class-disjoint private/public split (index lists)."""

from __future__ import annotations

from diffmi_ray.config.data import DataConfig
from diffmi_ray.data.splits import Split, make_split


def run(ctx) -> dict:
    data = DataConfig.model_validate(ctx.config["data"])
    split = make_split(data, ctx.seed)
    (ctx.out_dir / "split.json").write_text(split.to_json())
    return {"num_classes": split.num_classes, "private_train": len(split.private_train),
            "private_test": len(split.private_test), "public": len(split.public)}


def load(path) -> Split:
    """The Split stored in a finished `split` artifact folder."""
    from pathlib import Path

    return Split.from_json((Path(path) / "split.json").read_text())


def data_config_of(parent) -> DataConfig:
    """The DataConfig of a finished `split` parent (a pipeline.context.Parent)."""
    return DataConfig.model_validate(parent.config["config"]["data"])


def data_config_for(ctx, parent) -> DataConfig:
    """The split parent's DataConfig, checked against the geometry in the stage's own config."""
    from diffmi_ray.errors import UserError

    data = data_config_of(parent)
    image_size, channels = int(ctx.config["image_size"]), int(ctx.config["channels"])
    if (data.image_size, data.channels) != (image_size, channels):
        raise UserError(f"{ctx.stage}/{ctx.key}: geometry {channels}x{image_size}px differs from the split's "
                        f"{data.channels}x{data.image_size}px")
    return data
