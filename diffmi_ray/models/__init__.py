"""Classifiers, the CDM U-Net and GAN generators/discriminators (no training loops here).

``create(name, num_classes, **kw)`` builds any registered model; ``names(kind)`` lists them.
Each model module below registers itself on import.
"""

from diffmi_ray.models.registry import ModelInfo, create, get_info, names, register

# Model modules register on import. Keep this list in sync with the files of this package.
import importlib as _importlib

for _mod in ("classifiers", "unet", "gan_dcgan", "gan_kedmi", "gan_plgmi", "flows"):
    try:
        _importlib.import_module(f"diffmi_ray.models.{_mod}")
    except ModuleNotFoundError as _e:  # a module not written yet; only tolerate *that* module missing
        if _e.name != f"diffmi_ray.models.{_mod}":
            raise

__all__ = ["ModelInfo", "create", "get_info", "names", "register"]
