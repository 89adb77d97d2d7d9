"""PLG-MI's conditional GAN (Yuan et al., AAAI 2023): ResNet generator with categorical conditional
batch norm, and a spectrally normalised ResNet projection discriminator (Miyato & Koyama, 2018).

* :class:`ResNetGenerator` -- ``(z (B, z_dim), y (B,) long) -> image (B, C, S, S)`` in **[-1, 1]**
  (tanh). ``to_unit`` maps it to [0, 1]. (PLG-MI itself feeds the [-1, 1] output straight to the
  target classifier; our attacks convert with ``to_unit`` to follow the package's pixel convention.)
* :class:`SNProjectionDiscriminator` -- ``(x (B, C, S, S), y (B,) long or None) -> (B, 1)`` unbounded,
  ``l6(h) + <embed(y), h>`` with h the sum-pooled features (hinge loss in PLG-MI).

The paper configurations (64 px, width 64, z 128, 1000 classes) have exactly the state_dicts of
``gen_latest.pth.tar`` / ``dis_latest.pth.tar`` (``manifests/plgmi_generator_64.json``,
``plgmi_discriminator_64.json``). The discriminator uses the *hook-based*
``torch.nn.utils.spectral_norm`` on purpose, so its keys are ``X.weight_orig`` (parameter) and
``X.weight_u`` / ``X.weight_v`` (buffers) as in those checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from diffmi_ray.models.gan_dcgan import GAN_IMAGE_SIZES, GeneratorAPI, num_doublings
from diffmi_ray.models.registry import register


class CategoricalConditionalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d without its own affine; per-class gamma/beta come from embeddings.

    ``forward(x (B, C, H, W), y (B,) long) = gamma[y] * BN(x) + beta[y]`` with running statistics
    shared by all classes. Keys: ``running_mean``, ``running_var``, ``num_batches_tracked``,
    ``weights.weight`` (num_classes, C; init 1) and ``biases.weight`` (num_classes, C; init 0).
    """

    def __init__(self, num_classes: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False, track_running_stats=True)
        self.weights = nn.Embedding(num_classes, num_features)
        self.biases = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.weights.weight)
        nn.init.zeros_(self.biases.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = super().forward(x)
        gamma = self.weights(y)[:, :, None, None]  # (B, C, 1, 1)
        beta = self.biases(y)[:, :, None, None]
        return gamma * h + beta


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class GenBlock(nn.Module):
    """Pre-activation up-sampling residual block with class-conditional BN.

    residual: CBN(y) -> ReLU -> bilinear x2 -> Conv3x3 (in -> out) -> CBN(y) -> ReLU -> Conv3x3;
    shortcut: bilinear x2 -> Conv1x1 (in -> out). (B, in, H, W) -> (B, out, 2H, 2W).
    """

    def __init__(self, in_ch: int, out_ch: int, num_classes: int):
        super().__init__()
        # Registration order fixes the state_dict order of the checkpoints: c1, c2, b1, b2, c_sc.
        self.c1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.c2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.b1 = CategoricalConditionalBatchNorm2d(num_classes, in_ch)
        self.b2 = CategoricalConditionalBatchNorm2d(num_classes, out_ch)
        self.c_sc = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.c1(_upsample2x(F.relu(self.b1(x, y))))
        h = self.c2(F.relu(self.b2(h, y)))
        return self.c_sc(_upsample2x(x)) + h


class ResNetGenerator(GeneratorAPI, nn.Module):
    """PLG-MI conditional generator: ``forward(z (B, z_dim), y (B,) long) -> (B, C, S, S)`` in [-1, 1].

    Layout (``n = log2(S / bottom_width)``, ``top = width * 2**n``): ``l1`` = Linear(z_dim,
    top * bottom_width**2) -> view (B, top, bw, bw); ``block2`` .. ``block{n+1}`` = :class:`GenBlock`
    halving channels and doubling size; ``b6`` = BatchNorm2d(width) + ReLU; ``conv6`` = Conv1x1
    (width -> C); tanh. At 64 px / width 64 / bw 4: 1024 -> 512 -> 256 -> 128 -> 64 -> 3 channels.
    Latents are z ~ N(0, I) (PLG-MI's 'normal' distribution).
    """

    out_range = "pm1"
    conditional = True

    def __init__(self, num_classes: int = 1000, z_dim: int = 128, image_size: int = 64, channels: int = 3,
                 width: int = 64, bottom_width: int = 4):
        super().__init__()
        n = num_doublings(image_size, bottom_width)
        top = width * 2 ** n
        self.num_classes, self.z_dim, self.image_size, self.channels = num_classes, z_dim, image_size, channels
        self.width, self.bottom_width, self.num_blocks = width, bottom_width, n
        self.l1 = nn.Linear(z_dim, top * bottom_width ** 2)
        for i in range(n):
            setattr(self, f"block{i + 2}", GenBlock(top // 2 ** i, top // 2 ** (i + 1), num_classes))
        self.b6 = nn.BatchNorm2d(width)
        self.conv6 = nn.Conv2d(width, channels, 1, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z: (B, z_dim) float; y: (B,) long class indices in [0, num_classes). Returns (B, C, S, S) in [-1, 1]."""
        if y is None:
            raise ValueError("ResNetGenerator is class-conditional: pass labels y (B,)")
        h = self.l1(z).view(z.size(0), -1, self.bottom_width, self.bottom_width)  # (B, top, bw, bw)
        for i in range(self.num_blocks):
            h = getattr(self, f"block{i + 2}")(h, y)
        return torch.tanh(self.conv6(F.relu(self.b6(h))))


def _sn_conv(cin: int, cout: int, k: int, gain: float) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, 1, k // 2)
    nn.init.xavier_uniform_(conv.weight, gain)  # PLG-MI / SNGAN init, applied before the SN wrap
    return spectral_norm(conv)


class DisBlock(nn.Module):
    """SN residual block: residual ReLU -> Conv3x3 (in -> in) -> ReLU -> Conv3x3 (in -> out) [-> avgpool 2];
    shortcut Conv1x1 (in -> out) [-> avgpool 2]."""

    def __init__(self, in_ch: int, out_ch: int, downsample: bool = True):
        super().__init__()
        self.downsample = downsample
        self.c1 = _sn_conv(in_ch, in_ch, 3, 2 ** 0.5)
        self.c2 = _sn_conv(in_ch, out_ch, 3, 2 ** 0.5)
        self.c_sc = _sn_conv(in_ch, out_ch, 1, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x))))
        sc = self.c_sc(x)
        if self.downsample:
            h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)
        return h + sc


class OptimizedDisBlock(nn.Module):
    """First SN block (no pre-activation on the raw image): residual Conv3x3 -> ReLU -> Conv3x3 -> avgpool 2;
    shortcut avgpool 2 -> Conv1x1. (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.c1 = _sn_conv(in_ch, out_ch, 3, 2 ** 0.5)
        self.c2 = _sn_conv(out_ch, out_ch, 3, 2 ** 0.5)
        self.c_sc = _sn_conv(in_ch, out_ch, 1, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class SNProjectionDiscriminator(nn.Module):
    """PLG-MI discriminator: ``forward(x (B, C, S, S), y (B,) long | None) -> (B, 1)`` unbounded.

    Layout (``n = log2(S / 2)``): ``block1`` = :class:`OptimizedDisBlock` (C -> width),
    ``block2`` .. ``block{n}`` = :class:`DisBlock` doubling channels, each halving S (ending at 2x2);
    ReLU, global **sum** pooling -> h (B, top) with ``top = width * 2**(n-1)``;
    output ``l6(h) + sum(l_y(y) * h, 1)`` (the projection term is skipped when y is None).
    Every conv/linear/embedding has hook-based spectral norm (one power iteration per training forward).

    Input range: whatever the generator produces (PLG-MI trains on its [-1, 1] tanh output).
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 64, channels: int = 3, width: int = 64):
        super().__init__()
        n = num_doublings(image_size, 2)
        self.num_classes, self.image_size, self.channels, self.width, self.num_blocks = (
            num_classes, image_size, channels, width, n)
        self.block1 = OptimizedDisBlock(channels, width)
        for i in range(2, n + 1):
            setattr(self, f"block{i}", DisBlock(width * 2 ** (i - 2), width * 2 ** (i - 1)))
        top = width * 2 ** (n - 1)
        l6 = nn.Linear(top, 1)
        nn.init.xavier_uniform_(l6.weight)
        self.l6 = spectral_norm(l6)
        l_y = nn.Embedding(num_classes, top)
        nn.init.xavier_uniform_(l_y.weight)
        self.l_y = spectral_norm(l_y)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, S, S); y: (B,) long or None (unconditional score). Returns (B, 1)."""
        h = x
        for i in range(1, self.num_blocks + 1):
            h = getattr(self, f"block{i}")(h)
        h = F.relu(h).sum(dim=(2, 3))  # (B, top) global sum pooling
        out = self.l6(h)  # (B, 1)
        if y is not None:
            out = out + (self.l_y(y) * h).sum(dim=1, keepdim=True)
        return out


@register("plgmi_generator_64", kind="generator", image_sizes=(64,), channels=(3,),
          description="PLG-MI conditional ResNet generator, z=128, 64 px RGB, tanh [-1,1]; forward(z, y)",
          manifest="plgmi_generator_64", checkpoint_key_prefix="", z_dim=128, out_range="pm1")
def _plgmi_generator_64(num_classes: int = 1000) -> ResNetGenerator:
    return ResNetGenerator(num_classes=num_classes, z_dim=128, image_size=64, channels=3, width=64, bottom_width=4)


@register("plgmi_discriminator_64", kind="discriminator", image_sizes=(64,), channels=(3,),
          description="PLG-MI SN ResNet projection discriminator, 64 px RGB; forward(x, y) -> (B,1)",
          manifest="plgmi_discriminator_64", checkpoint_key_prefix="")
def _plgmi_discriminator_64(num_classes: int = 1000) -> SNProjectionDiscriminator:
    return SNProjectionDiscriminator(num_classes=num_classes, image_size=64, channels=3, width=64)


@register("plgmi_generator", kind="generator", image_sizes=GAN_IMAGE_SIZES, channels=(1, 3), z_dim=128,
          out_range="pm1",
          description="PLG-MI conditional ResNet generator; kw image_size, channels, width, z_dim, bottom_width; "
                      "output [-1,1]")
def _plgmi_generator(num_classes: int, *, image_size: int = 64, channels: int = 3, width: int = 64,
                     z_dim: int = 128, bottom_width: int = 4) -> ResNetGenerator:
    return ResNetGenerator(num_classes=num_classes, z_dim=z_dim, image_size=image_size, channels=channels,
                           width=width, bottom_width=bottom_width)


@register("plgmi_discriminator", kind="discriminator", image_sizes=GAN_IMAGE_SIZES, channels=(1, 3),
          description="PLG-MI SN projection discriminator; kw image_size, channels, width; output (B,1)")
def _plgmi_discriminator(num_classes: int, *, image_size: int = 64, channels: int = 3,
                         width: int = 64) -> SNProjectionDiscriminator:
    return SNProjectionDiscriminator(num_classes=num_classes, image_size=image_size, channels=channels, width=width)
