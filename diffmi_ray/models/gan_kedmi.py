"""KED-MI's (k+1)-way discriminator with minibatch discrimination (Chen et al., ICCV 2021).

:class:`MinibatchDiscriminator` maps images (B, C, S, S) to ``(feat (B, F), logits (B, num_classes))``:

* four conv blocks (Conv + InstanceNorm(affine) + LeakyReLU(0.2)); the first three 5x5 stride 2,
  the last 3x3 stride 2, so S shrinks by 16: ``feat`` is their flattened output,
  ``F = 4*width * (S/16)**2`` (4096 at the paper's 64 px / width 64);
* minibatch discrimination (Salimans et al., 2016) appends ``mbd_features`` batch statistics to feat;
* a linear head gives C logits. The KED-MI GAN reads "real" as ``logsumexp(logits)`` (the implicit
  (k+1)-th class has logit 0) and trains the head on the target's soft labels.

Because of minibatch discrimination, **each sample's logits depend on the rest of the batch**; feat
does not. The paper configuration has exactly the keys of ``improved_celeba_D.tar``
(``manifests/kedmi_minibatch_discriminator_64.json``; its single mbd parameter ``mbd1.T`` is
(4096, 64, 50)).
"""

from __future__ import annotations

import torch
from torch import nn

from diffmi_ray.models.gan_dcgan import GAN_IMAGE_SIZES
from diffmi_ray.models.registry import register


class MinibatchDiscrimination(nn.Module):
    """Salimans et al. (2016) minibatch features: ``(N, A) -> (N, A + B)``.

    ``T`` (A, B, K) projects each sample to B rows of K numbers, ``M_i`` (B, K). For sample i and row b:
    ``o_i[b] = sum_{j != i} exp(-||M_i[b] - M_j[b]||_1)`` (``mean=True`` divides by N-1). The output is
    ``cat([x, o], 1)``. With N = 1 the appended features are all zero.
    """

    def __init__(self, in_features: int, out_features: int, kernel_dims: int, mean: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.kernel_dims, self.mean = in_features, out_features, kernel_dims, mean
        self.T = nn.Parameter(torch.empty(in_features, out_features, kernel_dims))
        nn.init.normal_(self.T, 0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        m = (x @ self.T.view(self.in_features, -1)).view(n, self.out_features, self.kernel_dims)  # (N, B, K)
        dist = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(3)  # (N, N, B) L1 distances
        o = torch.exp(-dist).sum(0) - 1.0  # (N, B); minus exp(0) = 1 removes j = i
        if self.mean:
            o = o / max(n - 1, 1)
        return torch.cat([x, o], 1)


def _conv_in_lrelu(cin: int, cout: int, k: int, s: int, p: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.2))


class MinibatchDiscriminator(nn.Module):
    """KED-MI discriminator: ``forward(x: (B, C, S, S)) -> (feat (B, F), logits (B, num_classes))``.

    Args:
        num_classes: width of the classification head (the target's classes; 1000 in the paper).
        image_size: S, a multiple of 16 (32, 64 or 128 are built and tested); S >= 32 so that
            instance norm sees more than one pixel.
        channels: C, input channels.
        width: base channel count (layers have width, 2w, 4w, 4w channels).
        mbd_features, mbd_kernel_dims: B and K of :class:`MinibatchDiscrimination` (64 and 50 in KED-MI).

    Input range: as the generator produces it (KED-MI: [0, 1]). Logits are unbounded.
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 64, channels: int = 3, width: int = 64,
                 mbd_features: int = 64, mbd_kernel_dims: int = 50):
        super().__init__()
        if image_size % 16 or image_size < 32:
            raise ValueError(f"image_size must be a multiple of 16 and >= 32, got {image_size}")
        self.num_classes, self.image_size, self.channels, self.width = num_classes, image_size, channels, width
        self.layer1 = _conv_in_lrelu(channels, width, 5, 2, 2)
        self.layer2 = _conv_in_lrelu(width, width * 2, 5, 2, 2)
        self.layer3 = _conv_in_lrelu(width * 2, width * 4, 5, 2, 2)
        self.layer4 = _conv_in_lrelu(width * 4, width * 4, 3, 2, 1)
        self.feat_dim = width * 4 * (image_size // 16) ** 2
        self.mbd1 = MinibatchDiscrimination(self.feat_dim, mbd_features, mbd_kernel_dims)
        self.fc_layer = nn.Linear(self.feat_dim + mbd_features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, S, S). Returns (feat (B, F) before minibatch discrimination, logits (B, num_classes))."""
        h = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 4w, S/16, S/16)
        feat = h.flatten(1)  # (B, F)
        logits = self.fc_layer(self.mbd1(feat))  # (B, num_classes)
        return feat, logits


@register("kedmi_minibatch_discriminator_64", kind="discriminator", image_sizes=(64,), channels=(3,),
          description="KED-MI minibatch-discrimination D, 64 px RGB -> (feat[B,4096], logits[B,C])",
          manifest="kedmi_minibatch_discriminator_64", checkpoint_key_prefix="module.")
def _kedmi_minibatch_discriminator_64(num_classes: int = 1000) -> MinibatchDiscriminator:
    return MinibatchDiscriminator(num_classes=num_classes, image_size=64, channels=3, width=64)


@register("kedmi_discriminator", kind="discriminator", image_sizes=GAN_IMAGE_SIZES, channels=(1, 3),
          description="KED-MI minibatch-discrimination D; kw image_size, channels, width, mbd_features, "
                      "mbd_kernel_dims; -> (feat, logits[B,C])")
def _kedmi_discriminator(num_classes: int, *, image_size: int = 64, channels: int = 3, width: int = 64,
                         mbd_features: int = 64, mbd_kernel_dims: int = 50) -> MinibatchDiscriminator:
    return MinibatchDiscriminator(num_classes=num_classes, image_size=image_size, channels=channels, width=width,
                                  mbd_features=mbd_features, mbd_kernel_dims=mbd_kernel_dims)
