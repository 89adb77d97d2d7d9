"""diffmi_ray: a Ray-distributed experiment grid runner for white-box model inversion attacks.

Conventions used everywhere (see :mod:`diffmi_ray.conventions`):
images are float tensors in [0, 1] with shape (B, C, H, W) at every module boundary.
"""

__version__ = "0.1.0"
