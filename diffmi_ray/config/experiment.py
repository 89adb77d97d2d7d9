"""An experiment (one grid point) and a grid file: protocol, base experiment, axes, resources.

Layout of a grid YAML (every key optional unless marked)::

    name: quickstart                 # required; results go to <storage>/<name>/
    storage: results                 # storage root (local path or fsspec URI); artifacts are shared
    include: base.yaml               # a base grid file this one overrides (deep merge; lists replace)
    protocol:                        # pinned evaluation protocol
      classes: 5                     #   attack the first C target classes
      images_per_class: 5            #   M reconstructions per class
      eval: {model: small_resnet}    #   evaluation classifier (never the target)
      evaluation: {...}              #   metric options (EvaluationConfig)
    base: {...}                      # the experiment every grid point starts from (ExperimentConfig)
    axes:                            # dotted key (inside base) -> list of values; cartesian product
      method: [diff_mi, gmi]
      diff_mi.attack.k: [1, 2]
    variants:                        # optional: keys set together, multiplied with the axes
      - {setting: standard}
      - {setting: distribution_shift, data.public: {dataset: uci_digits}}
    resources: {attack: {cpus: 1}}   # per stage type (StageResources)
    run: {max_concurrent_trials: 2}  # runner options
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffmi_ray.config.base import StrictModel
from diffmi_ray.config.classifier import ClassifierConfig
from diffmi_ray.config.data import DataConfig
from diffmi_ray.config.evaluation import EvaluationConfig
from diffmi_ray.config.methods import (DiffMIConfig, GMIConfig, KEDMIConfig, PLGMIConfig, PPAConfig,
                                       PseudoLabelConfig, VMIConfig)

STAGES = ("split", "train_classifier", "pseudo_labels", "train_prior", "finetune_cdm", "attack", "evaluate")
"""Stage types, in dependency order."""

MethodName = Literal["diff_mi", "gmi", "kedmi", "plgmi", "vmi", "ppa"]


class ExperimentConfig(StrictModel):
    """One grid point: data, target classifier, method and every method's options."""

    seed: int = Field(0, ge=0, description="Seed of every stage of this point.")
    setting: str = Field("standard", description="Free label of the paper setting (standard, distribution_shift, ...)"
                         " used by reports to match the paper's tables.")
    method: MethodName = Field("diff_mi", description="Attack method.")
    data: DataConfig
    target: ClassifierConfig = Field(description="Target classifier T (trained on the private train split).")
    pseudo_labels: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    diff_mi: DiffMIConfig = Field(default_factory=DiffMIConfig)
    gmi: GMIConfig = Field(default_factory=GMIConfig)
    kedmi: KEDMIConfig = Field(default_factory=KEDMIConfig)
    plgmi: PLGMIConfig = Field(default_factory=PLGMIConfig)
    vmi: VMIConfig = Field(default_factory=VMIConfig)
    ppa: PPAConfig = Field(default_factory=PPAConfig)

    def method_config(self):
        """The selected method's config section."""
        return getattr(self, self.method)


class ProtocolConfig(StrictModel):
    """The pinned evaluation protocol (PROTOCOL.md §5)."""

    classes: int = Field(300, ge=1, description="Attack the first C target classes.")
    images_per_class: int = Field(5, ge=1, description="Reconstructions M per attacked class.")
    eval: ClassifierConfig = Field(description="Evaluation classifier E (different from T, trained on D_pri).")
    reference_images_per_class: int | None = Field(
        None, ge=1, description="Private training images per attacked class used as references by every metric "
        "(KNN Dist, FID, pairwise IQA/LPIPS): the first N of the class in split order. None = all of them (the "
        "paper: about 27 per CelebA identity); CPU grids cap MNIST's ~450 per digit.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Metric options.")


class StageResources(StrictModel):
    """Resources of one stage type. Training stages run as Ray Train jobs with `num_workers` workers
    (0 = in the trial process, no worker group); attacks run as Ray Tune trials."""

    num_workers: int = Field(0, ge=0, description="Ray Train workers (0 = local, no worker group).")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs per Ray Train worker or per task.")
    gpus_per_worker: float = Field(0.0, ge=0.0, description="GPUs per worker (or per task when num_workers=0).")
    max_retries: int = Field(1, ge=0, description="Retries of a failed run (Ray Train / Tune FailureConfig).")


def _default_resources() -> dict[str, StageResources]:
    return {s: StageResources() for s in STAGES}


class RunOptions(StrictModel):
    """Runner options."""

    max_concurrent_trials: int = Field(0, ge=0, description="Concurrent Tune trials (0 = as resources allow).")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads per task (0 = torch default).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device of stage computations.")


class GridConfig(StrictModel):
    """A whole grid file after `include` merging (axes not yet expanded)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Grid name; results go to <storage>/<name>/.")
    storage: str = Field("results", description="Storage root: local path (relative to the current directory"
                         " unless absolute) or fsspec URI (s3://, gs://, file://).")
    include: str | None = Field(None, description="Base grid file this file overrides (already merged here).")
    protocol: ProtocolConfig
    base: ExperimentConfig
    axes: dict[str, list] = Field(default_factory=dict, description="Dotted key -> values (cartesian product).")
    variants: list[dict] = Field(default_factory=list, description="Bundles of dotted key -> value applied "
                                 "together (e.g. a setting label with its public dataset); the grid is the "
                                 "product of the axes and the variants.")
    resources: dict[Literal["split", "train_classifier", "pseudo_labels", "train_prior", "finetune_cdm",
                            "attack", "evaluate"], StageResources] = Field(default_factory=_default_resources)
    run: RunOptions = Field(default_factory=RunOptions)

    def stage_resources(self, stage: str) -> StageResources:
        return self.resources.get(stage) or StageResources()
