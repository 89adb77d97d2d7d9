"""PLG-MI's pseudo-label-guided conditional GAN prior (prior kind ``gan_plgmi``; Yuan et al., AAAI 2023).

Data: the top-n pseudo-labelled public images of the ``pseudo_labels`` parent (per class y the n public
images T scores highest for y; an image picked for two classes appears twice), with the official
dequantisation noise U(0, 1/256), shown to D in G's range [-1, 1].

Models: conditional ResNet generator G(z, y) (categorical conditional BN, tanh) and the spectrally
normalised projection discriminator D(x, y). Losses (hinge, official ``train_cgan.py``)::

    L_D = E[relu(1 - D(x, y))] + E[relu(1 + D(G(z, y'), y'))],       y' ~ U{0..C-1}, z ~ N(0, I)
    L_G = -E[D(G(z, y'), y')] + alpha * L_MM(T(aug(G(z, y'))), y')   (max-margin, alpha 0.2)

``aug`` is PLG-MI's training transform (:func:`diffmi_ray.attacks.latent.augment`: random resized crop
0.8-1, colour jitter with p = 0.5, horizontal flip, rotation 5 deg); T sees [0, 1] images (the
package convention: ``G.to_unit``). One iteration is one generator step followed by ``n_critic``
(n_dis) discriminator steps, as in the official loop; the default length is 30k iterations with Adam
2e-4 (0, 0.9). Loop, resumability, distribution and artifact as in :mod:`diffmi_ray.training.gan_wgangp`.
Parents: ``split``, ``target`` and ``pseudo_labels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffmi_ray.attacks.latent import augment, sample_augment_params
from diffmi_ray.attacks.losses import max_margin_loss
from diffmi_ray.config.methods import PLGMIPriorConfig
from diffmi_ray.conventions import to_pm1
from diffmi_ray.errors import UserError
from diffmi_ray.training.common import seed_everything
from diffmi_ray.training.gan_kedmi import target_of
from diffmi_ray.training.gan_wgangp import (BatchStream, average_gradients, build_models, from_community, load,
                                            public_images, run_loop, set_requires_grad, step_generator,
                                            sync_buffers, total_iterations, write_artifact)

KIND = "gan_plgmi"
#: colour-jitter probability of the official stage-1 (training) transform
TRAIN_COLOR_P = 0.5


def hinge_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """E[relu(1 - D(real))] + E[relu(1 + D(fake))]."""
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


def pseudo_labelled_public(ctx) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images (N, C, H, W) in [0, 1], pseudo-labels (N,), number of classes) from the parents."""
    from diffmi_ray.pipeline.stages.pseudo_labels import load_pseudo_labels, training_pairs

    pl = load_pseudo_labels(ctx.parent("pseudo_labels").path)
    pos, labels = training_pairs(pl)
    x_pub = public_images(ctx)
    if int(pl["num_public"]) != len(x_pub):
        raise UserError(f"{ctx.stage}/{ctx.key}: the pseudo-labels cover {pl['num_public']} public images, "
                        f"the split has {len(x_pub)}")
    return x_pub[pos], labels.long(), int(pl["num_classes"])


def train(ctx) -> dict:
    """Train (or load) PLG-MI's conditional GAN; rank 0 writes the artifact. Returns metrics for the record."""
    cfg = PLGMIPriorConfig.model_validate(ctx.config["prior"])
    tc = cfg.train
    size, ch = int(ctx.config["image_size"]), int(ctx.config["channels"])
    T, num_classes = target_of(ctx)
    seed_everything(ctx.seed, rank=0)  # identical initial weights on every worker
    G, D, gkw, dkw = build_models(cfg.arch, num_classes=num_classes, image_size=size, channels=ch)
    done = from_community(ctx, kind=KIND, arch=cfg.arch, train=tc, G=G, D=D, gkw=gkw, dkw=dkw,
                          num_classes=num_classes)
    if done is not None:
        return done

    dev = ctx.device
    xs, ys, n_cls = pseudo_labelled_public(ctx)
    if n_cls != num_classes:
        raise UserError(f"{ctx.stage}/{ctx.key}: pseudo-labels for {n_cls} classes, target has {num_classes}")
    G, D = G.to(dev).train(), D.to(dev).train()
    stream = BatchStream(xs, ys, batch_size=tc.batch_size, seed=ctx.seed)
    total = total_iterations(tc, len(xs))
    opt_g = torch.optim.Adam(G.parameters(), lr=tc.lr, betas=tuple(tc.betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=tc.lr, betas=tuple(tc.betas))
    b = stream.batch

    def fake_batch(g: torch.Generator):
        z = torch.randn(b, G.z_dim, generator=g).to(dev)
        y = torch.randint(0, num_classes, (b,), generator=g).to(dev)
        return z, y

    def step(i: int) -> dict:
        g = step_generator(ctx.seed, ctx.rank, i)
        stream.seek(i * tc.n_critic)
        # generator step: hinge adversarial loss + alpha * max-margin of T on augmented fakes
        set_requires_grad(D, False)
        set_requires_grad(G, True)
        z, y = fake_batch(g)
        fake = G(z, y)
        loss_adv = -D(fake, y).mean()
        aug = augment(G.to_unit(fake), sample_augment_params(b, g), color_p=TRAIN_COLOR_P)
        logits = T(aug)
        inv = max_margin_loss(logits, y)
        loss_g = loss_adv + cfg.alpha * inv
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        average_gradients(G)
        opt_g.step()
        t_acc = (logits.argmax(1) == y).float().mean()
        # discriminator steps
        set_requires_grad(G, False)
        set_requires_grad(D, True)
        for _ in range(tc.n_critic):
            real, y_real = stream.next()
            noise = torch.rand(real.shape, generator=g) / 256.0  # official dequantisation
            real, y_real = to_pm1(real + noise).to(dev), y_real.to(dev)
            z, y = fake_batch(g)
            with torch.no_grad():
                fake = G(z, y)
            loss_d = hinge_d_loss(D(real, y_real), D(fake, y))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            average_gradients(D)
            opt_d.step()
        return {"loss_d": loss_d.detach(), "loss_g": loss_adv.detach(), "max_margin": inv.detach(),
                "t_acc_aug": t_acc}

    res = run_loop(ctx, models={"G": G, "D": D}, optimizers={"G": opt_g, "D": opt_d}, total=total, step_fn=step,
                   checkpoint_every=tc.checkpoint_every)
    sync_buffers(G, D)
    write_artifact(ctx, kind=KIND, arch=cfg.arch, G=G, D=D, gkw=gkw, dkw=dkw, num_classes=num_classes,
                   source="trained", extra={"iterations": total, "losses": res["losses"],
                                            "training_images": len(xs)})
    return {"source": "trained", "iterations": total, "resumed_from": res["resumed_from"],
            "training_images": len(xs), **res["losses"]}


__all__ = ["KIND", "TRAIN_COLOR_P", "hinge_d_loss", "load", "pseudo_labelled_public", "train"]
