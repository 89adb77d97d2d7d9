"""KED-MI's inversion-specific GAN prior (prior kind ``gan_kedmi``; Chen et al., ICCV 2021).

The discriminator D (:class:`~diffmi_ray.models.gan_kedmi.MinibatchDiscriminator`, ``D(x) -> (feat,
logits (B, C))``) is a (C+1)-way semi-supervised classifier whose implicit "fake" class has logit 0, so
``lse(x) = logsumexp_k D_k(x)`` is its "real" score and ``sigmoid(lse)`` the probability of real. It
learns the target's knowledge from the public images: its C-way head is trained to T's soft labels.
Per critic step, with two independent real batches x_l, x_u and a fake batch G(z)::

    L_lab   = -E_{x_l} sum_k softmax(T(x_l))_k log softmax(D(x_l))_k          (soft cross-entropy)
    L_unlab = 1/2 (E_{x_u}[softplus(lse) - lse] + E_{G(z)}[softplus(lse)])     (= -log sigmoid(lse) on
                                                                                real, -log(1-sigmoid) on fake)
    L_D     = L_lab + L_unlab

and every generator step, with a third real batch x_u2 and fresh z::

    L_G = mean_d |E_{G(z)}[feat_d] - E_{x_u2}[feat_d]| + entropy_weight * H,   H = sum over the batch of
          the entropy of softmax(D(G(z)))                                      (feature matching + entropy)

H is summed over the batch as in the official code, here as batch mean x global ``batch_size`` so it
does not change with the number of workers. With ``feature_matching: false`` the first term becomes
the non-saturating loss E[softplus(-lse(G(z)))]. The official recipe (config/celeba.json of
SCccc21/Knowledge-Enriched-DMI) is Adam 2e-4 (0.5, 0.999), batch 64, 120 epochs, one generator step
every n_critic = 5 critic steps; T sees the public images in [0, 1] like G's sigmoid output.

An iteration is ``n_critic`` critic steps then one generator step; ``epochs`` count passes of the
labelled stream over the public set. Loop, resumability, distribution and artifact as in
:mod:`diffmi_ray.training.gan_wgangp` (the artifact's ``num_classes`` is the target's C, the width
of D's head). Parents: ``split`` and ``target``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmi_ray.config.methods import KEDMIPriorConfig
from diffmi_ray.training.common import seed_everything
from diffmi_ray.training.gan_wgangp import (BatchStream, average_gradients, build_models, from_community, load,
                                            public_images, run_loop, set_requires_grad, step_generator,
                                            sync_buffers, total_iterations, write_artifact)

KIND = "gan_kedmi"


def soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """-sum_k softmax(target)_k log softmax(logits)_k, batch mean. logits, target_logits (B, C)."""
    return -(target_logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of softmax(logits): (B, C) -> (B,) in nats."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def discriminator_loss(out_lab: Tensor, t_logits: Tensor, out_unlab: Tensor, out_fake: Tensor) -> tuple[Tensor, Tensor]:
    """(L_lab, L_unlab) of the module docstring from D's logits on labelled, unlabelled and fake batches."""
    lse_u, lse_f = torch.logsumexp(out_unlab, 1), torch.logsumexp(out_fake, 1)
    l_lab = soft_cross_entropy(out_lab, t_logits)
    l_unlab = 0.5 * (F.softplus(lse_u).mean() - lse_u.mean() + F.softplus(lse_f).mean())
    return l_lab, l_unlab


def generator_loss(feat_fake: Tensor, feat_real: Tensor, out_fake: Tensor, *, entropy_weight: float,
                   entropy_scale: float, feature_matching: bool = True) -> tuple[Tensor, Tensor]:
    """(L_G, H): feature matching (or non-saturating) + entropy_weight * H, H = mean entropy x entropy_scale."""
    if feature_matching:
        main = (feat_fake.mean(0) - feat_real.mean(0)).abs().mean()
    else:
        main = F.softplus(-torch.logsumexp(out_fake, 1)).mean()
    h = entropy(out_fake).mean() * entropy_scale
    return main + entropy_weight * h, h


def target_of(ctx) -> tuple[torch.nn.Module, int]:
    """(frozen target T on ctx.device, its number of classes C) from the ``target`` parent."""
    from diffmi_ray.pipeline.stages.train_classifier import classifier_info, load_classifier

    path = ctx.parent("target").path
    return load_classifier(path, ctx.device), int(classifier_info(path)["num_classes"])


def train(ctx) -> dict:
    """Train (or load) KED-MI's GAN; rank 0 writes the artifact. Returns metrics for the record."""
    cfg = KEDMIPriorConfig.model_validate(ctx.config["prior"])
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
    G, D = G.to(dev).train(), D.to(dev).train()
    x_pub = public_images(ctx)
    lab = BatchStream(x_pub, batch_size=tc.batch_size, seed=ctx.seed, stream=0)
    unlab = BatchStream(x_pub, batch_size=tc.batch_size, seed=ctx.seed, stream=1)
    unlab2 = BatchStream(x_pub, batch_size=tc.batch_size, seed=ctx.seed, stream=2)
    total = total_iterations(tc, len(x_pub))
    opt_g = torch.optim.Adam(G.parameters(), lr=tc.lr, betas=tuple(tc.betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=tc.lr, betas=tuple(tc.betas))

    def step(i: int) -> dict:
        g = step_generator(ctx.seed, ctx.rank, i)
        lab.seek(i * tc.n_critic)
        unlab.seek(i * tc.n_critic)
        unlab2.seek(i)
        set_requires_grad(G, False)
        set_requires_grad(D, True)
        for _ in range(tc.n_critic):
            (x_l,), (x_u,) = lab.next(), unlab.next()
            x_l, x_u = x_l.to(dev), x_u.to(dev)
            with torch.no_grad():
                fake = G(torch.randn(len(x_l), G.z_dim, generator=g).to(dev))
                t_logits = T(x_l)
            _, out_l = D(x_l)
            _, out_u = D(x_u)
            _, out_f = D(fake)
            l_lab, l_unlab = discriminator_loss(out_l, t_logits, out_u, out_f)
            loss_d = l_lab + l_unlab
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            average_gradients(D)
            opt_d.step()
        agree = (out_l.argmax(1) == t_logits.argmax(1)).float().mean()
        set_requires_grad(D, False)
        set_requires_grad(G, True)
        (x_u2,) = unlab2.next()
        with torch.no_grad():
            feat_real, _ = D(x_u2.to(dev))
        feat_fake, out_fake = D(G(torch.randn(lab.batch, G.z_dim, generator=g).to(dev)))
        loss_g, h = generator_loss(feat_fake, feat_real, out_fake, entropy_weight=cfg.entropy_weight,
                                   entropy_scale=float(tc.batch_size), feature_matching=cfg.feature_matching)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        average_gradients(G)
        opt_g.step()
        return {"loss_d": loss_d.detach(), "loss_lab": l_lab.detach(), "loss_unlab": l_unlab.detach(),
                "loss_g": loss_g.detach(), "entropy": h.detach(), "d_agrees_with_t": agree}

    res = run_loop(ctx, models={"G": G, "D": D}, optimizers={"G": opt_g, "D": opt_d}, total=total, step_fn=step,
                   checkpoint_every=tc.checkpoint_every)
    sync_buffers(G, D)
    write_artifact(ctx, kind=KIND, arch=cfg.arch, G=G, D=D, gkw=gkw, dkw=dkw, num_classes=num_classes,
                   source="trained", extra={"iterations": total, "losses": res["losses"]})
    return {"source": "trained", "iterations": total, "resumed_from": res["resumed_from"],
            "public_images": len(x_pub), **res["losses"]}


__all__ = ["KIND", "discriminator_loss", "entropy", "generator_loss", "load", "soft_cross_entropy", "train"]
