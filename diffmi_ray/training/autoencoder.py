"""Train the first-stage autoencoder of latent diffusion when no pretrained one is given.

Used by the CDM prior stage (:mod:`diffmi_ray.training.cdm`) for ``latent.pretrained: null``,
e.g. the offline CPU twin of Table VI. A KL-regularised autoencoder (diffusers ``AutoencoderKL``,
``latent.arch``) learns to reconstruct the CDM's training images::

    q(z | x) = N(mu(x), sigma(x)^2)          z ~ q(z | x) (reparameterised)
    L = mean |x - D(z)|  +  kl_weight * mean_b KL(q(z | x_b) || N(0, I))

x in [-1, 1] at ``latent.image_size``. This is LDM's objective without its LPIPS and patch-GAN terms
(those need downloaded VGG weights and a second network; at the small scale this path exists for,
the L1 + KL autoencoder reconstructs well). Adam(lr), ``iterations`` steps, batches drawn without
replacement from a generator keyed by (seed, step), posterior noise from (seed, step): the result
depends only on (images, config, seed), so every DDP worker trains the same weights on its own.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn

from diffmi_ray.config.methods import LatentConfig
from diffmi_ray.conventions import resize_square, sample_generator, to_pm1

__all__ = ["train_autoencoder"]

_STREAM = 0xAE01


def train_autoencoder(ae: nn.Module, images: Tensor, cfg: LatentConfig, *, seed: int,
                      device: torch.device | str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Train ``ae`` in place on [0, 1] CPU images (N, C, H, W); returns {"steps", "loss", "seconds"}.

    Every parameter is trainable during the call and frozen (eval mode) afterwards.
    """
    size = cfg.image_size or images.shape[-1]
    ae.to(device).train()
    for p in ae.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr)
    n = len(images)
    recent: list[float] = []
    t0 = time.time()
    log_every = max(1, cfg.iterations // 5)
    for step in range(1, cfg.iterations + 1):
        g = sample_generator(seed, _STREAM, step)
        idx = torch.randperm(n, generator=g)[:cfg.batch_size] if cfg.batch_size <= n else \
            torch.randint(n, (cfg.batch_size,), generator=g)
        x = to_pm1(resize_square(images[idx], size)).to(device)
        post = ae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = ae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).flatten(1).sum(1).mean()
        loss = (x - rec).abs().mean() + cfg.kl_weight * kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"autoencoder loss is {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [float(loss.detach())])[-50:]
        if step % log_every == 0 or step == cfg.iterations:
            log(f"autoencoder step {step}/{cfg.iterations} loss {sum(recent) / len(recent):.4f}")
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return {"steps": cfg.iterations, "loss": (sum(recent) / len(recent)) if recent else None,
            "seconds": round(time.time() - t0, 3)}
