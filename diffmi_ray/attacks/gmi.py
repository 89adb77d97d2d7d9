"""GMI attack (Zhang et al., CVPR 2020): optimise the latent of a public-data GAN under its critic.

Notation: G the DCGAN generator (images in [0, 1]), D the WGAN-GP critic, T the target, y the label.
For each requested image, ``restarts`` latents z ~ N(0, I) are optimised independently::

    L(z) = -D(G(z)) + lambda_id * CE(T(G(z)), y)                       (prior + identity loss)

with SGD, Nesterov momentum (the official update ``v <- m v - lr g; z <- z - m v_prev + (1+m) v`` is
torch's ``SGD(nesterov=True)``), z clamped to [-clamp, clamp] after every step (PROTOCOL.md §4:
lr 0.02, momentum 0.9, 1500 iterations, clamp 1, lambda_id 100, 5 restarts). The restart whose final
image has the highest target score (softmax probability of y) is kept.

Batch independence: the official loss is a batch mean, so each latent's step size shrinks with the
batch. Here the loss is the sum of per-image losses divided by the configured ``batch_size``: for a
full batch this is the official mean, and an image's result no longer depends on the batch it is in.
G and D run in eval mode (no batch coupling); z of (class c, repeat j, restart r) comes from
``sample_generator(seed, c, j, r, 0)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffmi_ray.attacks import latent
from diffmi_ray.attacks.base import Attack, AttackOutput, register, sample_ids
from diffmi_ray.config.methods import GMIAttackConfig
from diffmi_ray.errors import UserError


def load_prior(inputs, *, need_discriminator: bool, method: str):
    """(G, D, meta) of the attack's GAN prior artifact, checked against the target's image shape."""
    from diffmi_ray.training.gan_wgangp import load

    G, D, meta = load(inputs.generator_dir, inputs.device)
    if need_discriminator and D is None:
        raise UserError(f"{method}: the prior at {inputs.generator_dir} has no discriminator, which this attack "
                        f"needs; give train.discriminator_checkpoint with the community generator")
    size = int(meta.get("output_size") or meta["image_size"])  # G's images after its resize to the data size
    shape = (int(meta["channels"]), size, size)
    if shape != tuple(inputs.image_shape):
        raise UserError(f"{method}: the prior makes {shape} images, the target takes {tuple(inputs.image_shape)}")
    return G, D, meta


@register
class GMIAttack(Attack):
    name = "gmi"
    config_cls = GMIAttackConfig

    def __init__(self, config, inputs):
        super().__init__(config, inputs)
        self.G, self.D, self.meta = load_prior(inputs, need_discriminator=True, method=self.name)

    def invert(self, labels: torch.Tensor, seed: int) -> AttackOutput:
        cfg: GMIAttackConfig = self.config
        G, D, T = self.G, self.D, self.inputs.target
        labels = labels.long().cpu()
        ids = sample_ids(labels)
        n, R = len(labels), cfg.restarts
        keys = latent.restart_ids(ids, R)
        z = latent.initial_latents(G.z_dim, seed, keys, self.device).requires_grad_(True)  # (R*N, z_dim)
        y = labels.repeat(R).to(self.device)

        def loss_fn(_: int) -> torch.Tensor:
            raw = G(z)  # D judges G's own output range; T takes [0, 1]
            prior = -D(raw).sum()
            iden = F.cross_entropy(T(G.to_unit(raw)), y, reduction="sum")
            return (prior + cfg.lambda_id * iden) / cfg.batch_size

        opt = torch.optim.SGD([z], lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        latent.optimise([z], opt, loss_fn, cfg.iterations, after_step=lambda: latent.clamp_(z, cfg.clamp),
                        name="GMI loss")
        with torch.no_grad():
            images = G.to_unit(G(z.detach())).clamp(0, 1)
        scores = latent.label_scores(T, images, y)
        best, best_scores, restart = latent.select_best(images.view(R, n, *images.shape[1:]).cpu(),
                                                        scores.view(R, n))
        return AttackOutput(images=best, labels=labels, scores=best_scores, extras={"restart": restart})
