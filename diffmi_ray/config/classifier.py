"""Classifier sections: the target T and the evaluation classifier E, their training recipe, BiDO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffmi_ray.config.base import StrictModel


class BiDOConfig(StrictModel):
    """BiDO (Peng et al., KDD 2022): min dep(X, Z_j) and max dep(Z_j, Y) over hidden layers Z_j."""

    enabled: bool = Field(False, description="Train with the BiDO regulariser.")
    measure: Literal["hsic", "coco"] = Field("hsic", description="Dependency measure.")
    lambda_x: float = Field(0.05, ge=0.0, description="Weight of dep(X, Z) (minimised).")
    lambda_y: float = Field(0.5, ge=0.0, description="Weight of dep(Z, Y) (maximised).")
    sigma: float = Field(5.0, gt=0.0, description="Gaussian kernel width of HSIC/COCO.")


class ClassifierTrainConfig(StrictModel):
    """SGD recipe of PROTOCOL.md §1 (lr 1e-2, batch 64, momentum 0.9, wd 1e-4, h-flip)."""

    epochs: int = Field(50, ge=1, description="Training epochs over the private train split.")
    batch_size: int = Field(64, ge=1, description="Global batch size (split across workers).")
    lr: float = Field(1e-2, gt=0.0, description="SGD learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0.0, description="SGD weight decay.")
    lr_milestones: list[int] = Field(default_factory=list,
                                     description="Epochs at which the lr is multiplied by lr_gamma.")
    lr_gamma: float = Field(0.1, gt=0.0, description="lr decay factor at each milestone.")
    hflip: bool = Field(True, description="Random horizontal flip augmentation (off for digits).")
    random_crop_padding: int = Field(0, ge=0, description="Random-crop augmentation padding in pixels (0 = off).")
    pretrained: bool = Field(False, description="Start from ImageNet weights (downloads; torchvision models only).")
    bido: BiDOConfig = Field(default_factory=BiDOConfig, description="BiDO defense options.")


class ClassifierConfig(StrictModel):
    """A classifier: architecture, options and how it is obtained (trained here or loaded)."""

    model: str = Field(description="Model registry name (see `diffmi_ray.models.names('classifier')`).")
    model_kwargs: dict = Field(default_factory=dict, description="Extra keyword options of the model (width ...).")
    checkpoint: str | None = Field(None, description="Load this community checkpoint instead of training "
                                   "(KED-MI format `{'state_dict'}` with `module.` keys, or a raw state_dict).")
    train: ClassifierTrainConfig = Field(default_factory=ClassifierTrainConfig, description="Training recipe.")
