"""PLG-MI attack (Yuan et al., AAAI 2023): optimise z of the pseudo-label-guided conditional GAN.

Notation: G(z, y) the conditional generator (``to_unit`` maps its [-1, 1] output to [0, 1]), T the
target, aug PLG-MI's random transform (:func:`diffmi_ray.attacks.latent.augment`: random resized crop
0.8-1, colour jitter 0.2/0.2, horizontal flip, rotation 5 deg), V = ``aug_views``. Per image and
restart, z ~ N(0, I) is optimised with Adam (lr 0.1, 600 iterations; PROTOCOL.md §4)::

    L(z) = sum_{v=1..V} L_MM(T(aug_v(G(z, y))), y),     L_MM = -l_y + max_{k != y} l_k

with fresh transforms every step; of ``restarts`` seeds the one whose final (unaugmented) image has
the highest target score is kept (the official script reports every seed; we keep one image per
request like the other attacks).

Reproducibility and batch independence: z and the transform parameters of (class c, repeat j,
restart r) come from ``sample_generator(seed, c, j, r, stream)``; the loss is a sum of per-image terms
(over the configured ``batch_size``); G runs in eval mode.
"""

from __future__ import annotations

import torch

from diffmi_ray.attacks import latent
from diffmi_ray.attacks.base import Attack, AttackOutput, register, sample_ids
from diffmi_ray.attacks.gmi import load_prior
from diffmi_ray.attacks.losses import max_margin_loss
from diffmi_ray.config.methods import PLGMIAttackConfig
from diffmi_ray.errors import UserError


@register
class PLGMIAttack(Attack):
    name = "plgmi"
    config_cls = PLGMIAttackConfig

    def __init__(self, config, inputs):
        super().__init__(config, inputs)
        self.G, _, self.meta = load_prior(inputs, need_discriminator=False, method=self.name)
        if not self.G.conditional:
            raise UserError(f"plgmi: the prior's generator '{self.meta['generator']}' is not class-conditional")
        if int(self.meta["num_classes"]) < inputs.num_classes:
            raise UserError(f"plgmi: the generator knows {self.meta['num_classes']} classes, the target "
                            f"{inputs.num_classes}")

    def invert(self, labels: torch.Tensor, seed: int) -> AttackOutput:
        cfg: PLGMIAttackConfig = self.config
        G, T, dev = self.G, self.inputs.target, self.device
        labels = labels.long().cpu()
        n, R, V = len(labels), cfg.restarts, cfg.aug_views
        keys = latent.restart_ids(sample_ids(labels), R)
        z = latent.initial_latents(G.z_dim, seed, keys, dev).requires_grad_(True)  # (R*n, z_dim)
        y = labels.repeat(R).to(dev)
        # transform parameters of every step and view, per image: (R*n, iterations, V, AUG_DRAWS)
        u = latent.per_sample_uniform((cfg.iterations, V, latent.AUG_DRAWS), seed, keys, latent.STREAM_AUG)

        def loss_fn(i: int) -> torch.Tensor:
            x = G.to_unit(G(z, y))
            loss = 0.0
            for v in range(V):
                logits = T(latent.augment(x, u[:, i, v]))
                loss = loss + latent.per_sample_scale(max_margin_loss(logits, y), len(y), cfg.batch_size)
            return loss

        opt = torch.optim.Adam([z], lr=cfg.lr)
        latent.optimise([z], opt, loss_fn, cfg.iterations, name="PLG-MI loss")
        with torch.no_grad():
            images = G.to_unit(G(z.detach(), y)).clamp(0, 1)
        scores = latent.label_scores(T, images, y)
        best, best_scores, restart = latent.select_best(images.view(R, n, *images.shape[1:]).cpu(),
                                                        scores.view(R, n))
        return AttackOutput(images=best, labels=labels, scores=best_scores, extras={"restart": restart})
