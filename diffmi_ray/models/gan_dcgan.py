"""DCGAN-style generator and WGAN-GP critic of GMI (Zhang et al., CVPR 2020), also KED-MI's generator.

Two constructors, each usable at two scales:

* :class:`DCGANGenerator` -- ``z (B, z_dim) -> image (B, C, S, S)`` in **[0, 1]** (sigmoid output).
  A linear layer makes a 4x4 map, then ``log2(S/4)`` stride-2 transposed 5x5 convolutions double
  it up to S. The paper configuration (``z_dim=100, width=64, S=64, C=3``) has exactly the
  state_dict of the community checkpoints ``celeba_G.tar`` (GMI) and ``improved_celeba_G.tar``
  (KED-MI): see ``manifests/gmi_generator_64.json`` and ``kedmi_generator_64.json``.
* :class:`WGANCritic` -- ``image (B, C, S, S) -> score (B,)``, unbounded. Stride-2 5x5 convolutions
  halve S down to 4x4 (InstanceNorm with affine=True on all but the first), then a 4x4 convolution
  gives one number. The paper configuration matches ``celeba_D.tar`` (``gmi_discriminator_64.json``;
  KED-MI's binary-GAN critic has the same keys).

The same classes at CPU scale: e.g. ``image_size=32, channels=1, width=16``. Layer names do not
depend on the scale (``l1``, ``l2_5``, ``ls``), only how many layers there are.

This module also holds :class:`GeneratorAPI`, the small contract every GAN generator of the
package follows so attacks can treat them alike: attributes ``z_dim``, ``out_range`` ("01" or
"pm1"), ``conditional``, ``num_classes``, ``image_size``, ``channels``; methods ``to_unit(x)`` (to
[0, 1]) and ``sample_latent(n, generator)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffmi_ray.models.registry import register

#: Image sizes the scalable GAN models of this package are built and tested for.
GAN_IMAGE_SIZES = (32, 64, 128)


def num_doublings(image_size: int, base: int, what: str = "image_size") -> int:
    """``log2(image_size / base)`` as an int, or ValueError if that is not a whole power of two >= 1."""
    ratio = image_size / base
    n = int(round(math.log2(ratio))) if ratio > 0 else -1
    if n < 1 or base * 2 ** n != image_size:
        raise ValueError(f"{what} must be {base} times a power of two (>= {2 * base}), got {image_size}")
    return n


class GeneratorAPI:
    """Mixin: what every generator of the package exposes (set these attributes in ``__init__``).

    z_dim: length of the latent vector z, input shape (B, z_dim).
    out_range: "01" if ``forward`` returns images in [0, 1], "pm1" if in [-1, 1].
    conditional: True if ``forward`` takes ``(z, y)`` with y a LongTensor (B,) of class indices.
    """

    z_dim: int
    out_range: str
    conditional: bool = False
    num_classes: int = 0
    image_size: int
    channels: int

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Generator output -> images in [0, 1] (the package's pixel convention), same shape."""
        if self.out_range == "pm1":
            return (x + 1.0) * 0.5
        return x

    def sample_latent(self, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """Standard-normal latents (n, z_dim), drawn on CPU from ``generator`` then moved to ``device``
        (default: the device of the model's parameters)."""
        if device is None:
            device = next(self.parameters()).device  # type: ignore[attr-defined]
        return torch.randn(n, self.z_dim, generator=generator).to(device)


def _dconv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # 5x5 stride-2 transposed conv with output_padding=1 exactly doubles the spatial size.
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 5, 2, padding=2, output_padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class DCGANGenerator(GeneratorAPI, nn.Module):
    """GMI / KED-MI generator: ``forward(z: (B, z_dim)) -> (B, channels, image_size, image_size)`` in [0, 1].

    Layout (``n = log2(image_size / 4)``, ``top = width * 2**(n-1)``):
    ``l1`` = Linear(z_dim, top*16, no bias) + BatchNorm1d + ReLU -> view (B, top, 4, 4);
    ``l2_5`` = (n-1) x [ConvT 5x5 s2 (halves channels) + BN + ReLU], ConvT 5x5 s2 (width -> channels)
    with bias, Sigmoid. At 64 px / width 64 that is 512 -> 256 -> 128 -> 64 -> 3 channels.

    GMI's attack samples z ~ N(0, I) and clamps it to [-1, 1]; KED-MI optimises a Gaussian over z.
    The model is unconditional; ``num_classes`` is accepted by the registry factory and ignored.
    """

    out_range = "01"
    conditional = False

    def __init__(self, z_dim: int = 100, image_size: int = 64, channels: int = 3, width: int = 64):
        super().__init__()
        n = num_doublings(image_size, 4)
        top = width * 2 ** (n - 1)
        self.z_dim, self.image_size, self.channels, self.width = z_dim, image_size, channels, width
        self.l1 = nn.Sequential(
            nn.Linear(z_dim, top * 4 * 4, bias=False),
            nn.BatchNorm1d(top * 4 * 4),
            nn.ReLU(),
        )
        ups = [_dconv_bn_relu(top // 2 ** i, top // 2 ** (i + 1)) for i in range(n - 1)]
        self.l2_5 = nn.Sequential(
            *ups,
            nn.ConvTranspose2d(width, channels, 5, 2, padding=2, output_padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, z_dim) float; y: ignored (unconditional). Returns (B, C, S, S) in [0, 1]."""
        h = self.l1(z)
        h = h.view(h.size(0), -1, 4, 4)  # (B, top, 4, 4)
        return self.l2_5(h)


def _conv_in_lrelu(cin: int, cout: int) -> nn.Sequential:
    # InstanceNorm(affine=True) stands in for LayerNorm: a WGAN-GP critic must not use BatchNorm,
    # whose cross-sample coupling breaks the per-sample gradient penalty.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 5, 2, 2),
        nn.InstanceNorm2d(cout, affine=True),
        nn.LeakyReLU(0.2),
    )


class WGANCritic(nn.Module):
    """GMI WGAN-GP critic (``DGWGAN``): ``forward(x: (B, C, S, S)) -> (B,)`` unbounded score.

    Layout (``n = log2(image_size / 4)``): ``ls`` = Conv 5x5 s2 (channels -> width) + LeakyReLU(0.2),
    (n-1) x [Conv 5x5 s2 (doubles channels) + InstanceNorm(affine) + LeakyReLU(0.2)],
    Conv 4x4 (-> 1 channel, 1x1). At 64 px / width 64: 3 -> 64 -> 128 -> 256 -> 512 -> 1.

    Input range: whatever the generator it is trained against produces (GMI: [0, 1]).
    Higher score = more "real"; GMI's prior loss is ``-critic(G(z)).mean()``.
    """

    def __init__(self, image_size: int = 64, channels: int = 3, width: int = 64):
        super().__init__()
        n = num_doublings(image_size, 4)
        self.image_size, self.channels, self.width = image_size, channels, width
        downs = [_conv_in_lrelu(width * 2 ** i, width * 2 ** (i + 1)) for i in range(n - 1)]
        self.ls = nn.Sequential(
            nn.Conv2d(channels, width, 5, 2, 2),
            nn.LeakyReLU(0.2),
            *downs,
            nn.Conv2d(width * 2 ** (n - 1), 1, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, S, S). Returns (B,) critic scores."""
        return self.ls(x).view(-1)  # (B, 1, 1, 1) -> (B,)


# ---------------------------------------------------------------------------------------- registry

_PAPER = dict(image_sizes=(64,), channels=(3,))
_SCALABLE = dict(image_sizes=GAN_IMAGE_SIZES, channels=(1, 3))


@register("gmi_generator_64", kind="generator", description="GMI DCGAN generator, z=100, 64 px RGB, sigmoid [0,1]",
          manifest="gmi_generator_64", checkpoint_key_prefix="module.", z_dim=100, out_range="01", **_PAPER)
def _gmi_generator_64(num_classes: int = 0) -> DCGANGenerator:
    return DCGANGenerator(z_dim=100, image_size=64, channels=3, width=64)


@register("kedmi_generator_64", kind="generator",
          description="KED-MI generator (same architecture and keys as GMI's), z=100, 64 px RGB, [0,1]",
          manifest="kedmi_generator_64", checkpoint_key_prefix="module.", z_dim=100, out_range="01", **_PAPER)
def _kedmi_generator_64(num_classes: int = 0) -> DCGANGenerator:
    return DCGANGenerator(z_dim=100, image_size=64, channels=3, width=64)


@register("gmi_discriminator_64", kind="discriminator",
          description="GMI / KED-MI binary WGAN-GP critic (DGWGAN), 64 px RGB, output (B,)",
          manifest="gmi_discriminator_64", checkpoint_key_prefix="module.", **_PAPER)
def _gmi_discriminator_64(num_classes: int = 0) -> WGANCritic:
    return WGANCritic(image_size=64, channels=3, width=64)


@register("dcgan_generator", kind="generator", z_dim=100, out_range="01",
          description="DCGAN generator (GMI/KED-MI); kw image_size, channels, width, z_dim; output [0,1]",
          **_SCALABLE)
def _dcgan_generator(num_classes: int = 0, *, image_size: int = 64, channels: int = 3, width: int = 64,
                     z_dim: int = 100) -> DCGANGenerator:
    return DCGANGenerator(z_dim=z_dim, image_size=image_size, channels=channels, width=width)


@register("wgan_critic", kind="discriminator",
          description="WGAN-GP critic with instance norm (GMI); kw image_size, channels, width; output (B,)",
          **_SCALABLE)
def _wgan_critic(num_classes: int = 0, *, image_size: int = 64, channels: int = 3, width: int = 64) -> WGANCritic:
    return WGANCritic(image_size=image_size, channels=channels, width=width)
