"""Data section of an experiment: which dataset and classes are private / public, image geometry."""

from __future__ import annotations

from pydantic import Field, field_validator

from diffmi_ray.config.base import StrictModel


class DataSide(StrictModel):
    """One side of the attack: the private set D_pri or the public set D_pub."""

    dataset: str = Field(description="Dataset registry name (see `diffmi_ray.data.names()`).")
    classes: list[int] | None = Field(
        None, description="Class ids of the source dataset to use, in this order (private labels are "
        "re-indexed 0..C-1 in this order); a string 'a..b' is the inclusive range a, a+1, ..., b. "
        "None = all classes of the dataset.")
    root: str | None = Field(None, description="Folder of a real-folder dataset (CelebA, FFHQ, ...). "
                             "Unused for packaged datasets.")
    split_file: str | None = Field(
        None, description="Optional list of `filename label` lines selecting images (KED-MI-style "
        "CelebA split files). Relative paths are taken relative to `root`.")
    max_per_class: int | None = Field(None, ge=1, description="Keep at most this many images per class.")
    max_images: int | None = Field(None, ge=1, description="Keep at most this many images in total "
                                   "(deterministic subsample from the seed).")

    @field_validator("classes", mode="before")
    @classmethod
    def _class_range(cls, v):
        if isinstance(v, str):
            a, sep, b = v.partition("..")
            try:
                lo, hi = int(a), int(b)
            except ValueError:
                lo = hi = None
            if not sep or lo is None or lo < 0 or hi < lo:
                raise ValueError(f"a class range is written 'first..last' with 0 <= first <= last, got {v!r}")
            return list(range(lo, hi + 1))
        return v


class DataConfig(StrictModel):
    """Private / public datasets and the common image geometry."""

    private: DataSide = Field(description="The private dataset D_pri (target and evaluation classifiers train on it).")
    public: DataSide = Field(description="The public dataset D_pub (class-disjoint from the private one).")
    image_size: int = Field(64, ge=8, le=1024, description="Square image size in pixels after preprocessing.")
    channels: int = Field(3, description="Channels after preprocessing: 1 (gray) or 3 (RGB).")
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0,
                                 description="Fraction of each private class held out to test the classifiers.")

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        return v
