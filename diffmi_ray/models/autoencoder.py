"""The first-stage autoencoder of latent diffusion (paper Table VI: LDM, 256 px -> 64 x 64 latents).

A :class:`LatentCodec` wraps a diffusers ``AutoencoderKL`` (KL-regularised, LDM's kl-f*) or
``VQModel`` (LDM's vq-f*) and fixes the two maps the CDM stages need::

    encode:  images [0, 1] (B, C, H, W), any H = W
             -> resize to image_size (bilinear, antialiased) -> [-1, 1]
             -> z = posterior mean (KL) | pre-quantisation latent (VQ)
             -> z * scaling_factor                                  (B, c, image_size/f, image_size/f)
    decode:  z * scaling_factor -> / scaling_factor -> decoder (VQ: quantised, straight-through
             gradient) -> [-1, 1] space (not clamped) -> resize to ``size`` (default
             output_size: the data's image size, which the target classifier takes)

The decoder is differentiable (fine-tuning and the attack back-propagate through it); every
parameter is frozen. f = 2 ** (len(block_out_channels) - 1). The posterior mean is used rather than a
sample (the KL autoencoders of LDM have near-zero posterior std; the mean keeps encoding
deterministic so latents can be computed once).

Why hand-written: diffusers supplies the autoencoders; what is ours is only the fixed composition
(resizing, scaling, the choice of posterior mode) that the pretraining, fine-tuning and attack
stages must share exactly.

Artifact layout (inside a CDM artifact): ``autoencoder/`` is diffusers' ``save_pretrained`` folder
(``config.json`` + safetensors weights, no pickled code); ``model.json["latent"]`` holds
:meth:`LatentCodec.meta`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from diffmi_ray.config.methods import LatentConfig
from diffmi_ray.conventions import resize_square, to_pm1
from diffmi_ray.errors import UserError

__all__ = ["AE_FOLDER", "LatentCodec", "arch_config", "build_autoencoder", "downsample_factor", "load_pretrained",
           "local_pretrained_config", "latent_geometry"]

AE_FOLDER = "autoencoder"
_CLASSES = ("AutoencoderKL", "VQModel")


def _kind(ae: nn.Module) -> str:
    name = type(ae).__name__
    if name == "AutoencoderKL":
        return "kl"
    if name == "VQModel":
        return "vq"
    raise TypeError(f"unsupported autoencoder {name}; expected one of {_CLASSES}")


def downsample_factor(block_out_channels) -> int:
    """f = 2 ** (levels - 1) of a diffusers autoencoder with these per-level widths."""
    return 2 ** (len(block_out_channels) - 1)


class LatentCodec(nn.Module):
    """Frozen autoencoder + the fixed pixel <-> scaled-latent maps (see the module docstring).

    ae: a diffusers AutoencoderKL or VQModel; image_size: the pixel size it works at;
    scaling_factor: s (the CDM sees z * s); output_size: the size :meth:`decode` returns by default
    (the data's image size; default image_size).
    """

    def __init__(self, ae: nn.Module, image_size: int, scaling_factor: float = 1.0, output_size: int | None = None):
        super().__init__()
        self.ae = ae
        self.kind = _kind(ae)
        self.image_size = int(image_size)
        self.output_size = int(output_size or image_size)
        self.scaling_factor = float(scaling_factor)
        self.downsample = downsample_factor(ae.config.block_out_channels)
        if self.image_size % self.downsample:
            raise UserError(f"latent.image_size {self.image_size} is not divisible by the autoencoder's "
                            f"downsampling factor {self.downsample}")
        self.pixel_channels = int(ae.config.in_channels)
        self.latent_channels = int(ae.config.latent_channels)
        ae.eval()
        for p in ae.parameters():
            p.requires_grad_(False)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    def raw_latents(self, x01: Tensor) -> Tensor:
        """Unscaled latents z of [0, 1] images (B, C, H, W) -> (B, c, s, s)."""
        x = to_pm1(resize_square(x01, self.image_size))
        if self.kind == "kl":
            return self.ae.encode(x).latent_dist.mode()
        return self.ae.encode(x).latents

    def encode(self, x01: Tensor) -> Tensor:
        """Scaled latents z * s of [0, 1] images."""
        return self.raw_latents(x01) * self.scaling_factor

    def decode(self, z: Tensor, size: int | None = None) -> Tensor:
        """Images in the [-1, 1] space (not clamped) at ``size`` px (default output_size) from scaled latents."""
        z = z / self.scaling_factor
        x = self.ae.decode(z).sample if self.kind == "kl" else self.ae.decode(z, force_not_quantize=False).sample
        return resize_square(x, size or self.output_size)

    @torch.no_grad()
    def encode_all(self, images, batch_size: int, device: torch.device | str = "cpu",
                   mirrored: bool = False) -> tuple[Tensor, Tensor | None]:
        """(scaled latents, scaled latents of the horizontally mirrored images or None) of [0, 1] images
        (N, C, H, W), in batches; returned on the CPU.

        ``images``: a CPU tensor or anything whose slices are tensors (a
        :class:`~diffmi_ray.data.splits.LazyImages`, loaded batch by batch): one pass, so each batch
        is loaded once also when ``mirrored``.
        """
        out, out_m = [], []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            out.append(self.encode(x).cpu())
            if mirrored:
                out_m.append(self.encode(x.flip(-1)).cpu())
        empty = torch.empty(0, *self.latent_shape)
        return (torch.cat(out) if out else empty), ((torch.cat(out_m) if out_m else empty) if mirrored else None)

    def meta(self) -> dict:
        """The ``model.json["latent"]`` record (geometry, scale, kind)."""
        return {"kind": self.kind, "class": type(self.ae).__name__, "image_size": self.image_size,
                "scaling_factor": self.scaling_factor, "downsample": self.downsample,
                "pixel_channels": self.pixel_channels, "latent_channels": self.latent_channels,
                "latent_size": self.latent_size, "data_image_size": self.output_size}

    def save(self, folder: str | Path) -> None:
        """diffusers ``save_pretrained`` into ``folder/autoencoder`` (config.json + safetensors)."""
        self.ae.save_pretrained(str(Path(folder) / AE_FOLDER), safe_serialization=True)

    @classmethod
    def load(cls, folder: str | Path, meta: dict, device: torch.device | str = "cpu") -> "LatentCodec":
        """The codec saved by :meth:`save` in a CDM artifact ``folder`` with its ``model.json["latent"]``."""
        ae = _from_pretrained(str(Path(folder) / AE_FOLDER), None, where=f"{folder}/{AE_FOLDER}")
        return cls(ae, int(meta["image_size"]), float(meta["scaling_factor"]),
                   int(meta.get("data_image_size") or meta["image_size"])).to(device)


def arch_config(cfg: LatentConfig, channels: int, image_size: int) -> dict:
    """The ``AutoencoderKL`` constructor keywords (its config) of ``cfg.arch`` for ``channels``-channel
    images of ``image_size`` px."""
    a = cfg.arch
    levels = len(a.block_out_channels)
    return {"in_channels": channels, "out_channels": channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(a.block_out_channels), "layers_per_block": a.layers_per_block,
            "latent_channels": a.latent_channels, "norm_num_groups": a.norm_num_groups, "sample_size": image_size}


def build_autoencoder(cfg: LatentConfig, channels: int, image_size: int) -> nn.Module:
    """A randomly initialised ``AutoencoderKL`` of ``cfg.arch`` (:func:`arch_config`)."""
    from diffusers import AutoencoderKL

    a = cfg.arch
    bad = [w for w in a.block_out_channels if w % a.norm_num_groups]
    if bad:
        raise UserError(f"latent.arch.norm_num_groups {a.norm_num_groups} does not divide the widths {bad}")
    return AutoencoderKL(**arch_config(cfg, channels, image_size))


def _class_of(source: str, subfolder: str | None) -> str:
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(source, subfolder=subfolder)
    except Exception as e:  # noqa: BLE001 - diffusers raises OSError/EnvironmentError/HTTP errors here
        raise UserError(f"latent.pretrained: cannot read the autoencoder config of {source!r}"
                        f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {e}") from e
    name = config.get("_class_name", "AutoencoderKL")
    if name not in _CLASSES:
        raise UserError(f"latent.pretrained {source!r} is a {name}; expected one of {_CLASSES}")
    return name


def _from_pretrained(source: str, subfolder: str | None, where: str | None = None) -> nn.Module:
    import diffusers

    name = _class_of(source, subfolder)
    try:
        return getattr(diffusers, name).from_pretrained(source, subfolder=subfolder)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{where or 'latent.pretrained'}: cannot load {name} from {source!r}: {e}") from e


def load_pretrained(cfg: LatentConfig) -> nn.Module:
    """The diffusers autoencoder named by ``cfg.pretrained`` (+ ``cfg.subfolder``)."""
    if not cfg.pretrained:
        raise ValueError("latent.pretrained is not set")
    src = cfg.pretrained
    local = Path(src).expanduser()
    return _from_pretrained(str(local) if local.exists() else src, cfg.subfolder)


def local_pretrained_config(cfg: LatentConfig) -> dict | None:
    """The ``config.json`` of a local ``pretrained`` folder (+ ``subfolder``), or None (a Hub id)."""
    if cfg.pretrained is None:
        return None
    conf = Path(cfg.pretrained).expanduser() / (cfg.subfolder or "") / "config.json"
    return json.loads(conf.read_text()) if conf.is_file() else None


def latent_geometry(cfg: LatentConfig, data_size: int) -> tuple[int, int, int] | None:
    """(latent size, latent channels, downsample factor) known before anything runs, else None.

    Known for an ``arch`` autoencoder and for a local ``pretrained`` folder (its config.json); a Hub
    id is resolved only when the stage runs.
    """
    size = cfg.image_size or data_size
    if cfg.pretrained is None:
        f = downsample_factor(cfg.arch.block_out_channels)
        return size // f, cfg.arch.latent_channels, f
    c = local_pretrained_config(cfg)
    if c is None:
        return None
    f = downsample_factor(c.get("block_out_channels", [0]))
    return size // f, int(c.get("latent_channels", 4)), f
