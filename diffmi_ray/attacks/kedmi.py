"""KED-MI attack (Chen et al., ICCV 2021): learn a Gaussian over the latent per target class.

Notation: G the generator (images in [0, 1]), D KED-MI's (C+1)-way discriminator with ``D(x) ->
(feat, logits)``, ``lse(x) = logsumexp_k D_k(x)`` its "real" score, T the target, y the class.
For every class c (and each of ``restarts`` independent copies) a diagonal Gaussian
N(mu_c, exp(logvar_c)) over z is learned with the reparameterisation z = mu + exp(logvar/2) * eps::

    L(mu, logvar) = E_eps[softplus(lse(G(z))) - lse(G(z))] + lambda_id * E_eps[CE(T(G(z)), c)]

(the first term, -log sigmoid(lse), is the official "prior" loss in log-sum-exp form), with Adam
(lr 0.02; mu = 0 and logvar = 1 at the start, as in the official code; 2400 iterations, PLG-MI's copy
1500). The reconstructions are samples z ~ N(mu_c, exp(logvar_c)) of the learned distribution.
With a plain critic D (``D(x) -> score``) the prior is -D(G(z)) (the official non-"improved" branch).

Batching and reproducibility: each step draws ``batch_size`` samples per (class, restart). Because D's
minibatch discrimination couples the samples of a batch, D scores each (class, restart) group on its
own, so the learned distribution of a class does not depend on the other classes requested with it.
The step noise of group (c, r) comes from ``sample_generator(seed, c, r, 2)``; the output sample of
(class c, repeat j) uses eps from ``sample_generator(seed, c, j, 4)`` under the class's distribution.
With several restarts the distribution whose samples score highest under T (mean softmax probability
of c over ``batch_size`` fresh samples) is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffmi_ray.attacks import latent
from diffmi_ray.attacks.base import Attack, AttackOutput, register, sample_ids
from diffmi_ray.attacks.gmi import load_prior
from diffmi_ray.config.methods import KEDMIAttackConfig
from diffmi_ray.conventions import sample_generator


def prior_loss(d_out) -> torch.Tensor:
    """KED-MI's prior loss of one group's discriminator output: mean softplus(lse) - lse for the
    (feat, logits) discriminator, -mean(score) for a plain critic."""
    if isinstance(d_out, (tuple, list)):
        lse = torch.logsumexp(d_out[1], dim=1)
        return (F.softplus(lse) - lse).mean()
    return -d_out.mean()


@register
class KEDMIAttack(Attack):
    name = "kedmi"
    config_cls = KEDMIAttackConfig

    def __init__(self, config, inputs):
        super().__init__(config, inputs)
        self.G, self.D, self.meta = load_prior(inputs, need_discriminator=True, method=self.name)

    def _sample_groups(self, mu, logvar, eps):
        """z (K*n, z_dim) from mu, logvar (K, z_dim) and eps (K, n, z_dim)."""
        return (mu[:, None] + torch.exp(0.5 * logvar)[:, None] * eps).reshape(-1, mu.shape[1])

    def invert(self, labels: torch.Tensor, seed: int) -> AttackOutput:
        cfg: KEDMIAttackConfig = self.config
        G, D, T, dev = self.G, self.D, self.inputs.target, self.device
        labels = labels.long().cpu()
        classes = list(dict.fromkeys(labels.tolist()))  # first-appearance order
        R, n, zd = cfg.restarts, cfg.batch_size, G.z_dim
        groups = [(c, r) for r in range(R) for c in classes]  # restart-major
        k = len(groups)
        gens = [sample_generator(seed, c, r, latent.STREAM_EPS) for c, r in groups]
        y = torch.tensor([c for c, _ in groups]).repeat_interleave(n).to(dev)  # (k*n,)
        mu = torch.zeros(k, zd, device=dev, requires_grad=True)
        logvar = torch.ones(k, zd, device=dev, requires_grad=True)

        def loss_fn(_: int) -> torch.Tensor:
            eps = torch.stack([torch.randn(n, zd, generator=g) for g in gens]).to(dev)  # (k, n, zd)
            raw = G(self._sample_groups(mu, logvar, eps))
            ce = F.cross_entropy(T(G.to_unit(raw)), y, reduction="none").view(k, n).mean(1)  # (k,)
            prior = torch.stack([prior_loss(D(raw[i * n:(i + 1) * n])) for i in range(k)])  # per group
            return (prior + cfg.lambda_id * ce).sum()

        opt = torch.optim.Adam([mu, logvar], lr=cfg.lr)
        latent.optimise([mu, logvar], opt, loss_fn, cfg.iterations, name="KED-MI loss")
        mu, logvar = mu.detach(), logvar.detach()

        best = {c: 0 for c in classes}
        if R > 1:  # keep the restart whose distribution T likes best
            eps = torch.stack([torch.randn(n, zd, generator=sample_generator(seed, c, r, latent.STREAM_EVAL))
                               for c, r in groups]).to(dev)
            with torch.no_grad():
                imgs = G.to_unit(G(self._sample_groups(mu, logvar, eps))).clamp(0, 1)
            mean_score = latent.label_scores(T, imgs, y).view(R, len(classes), n).mean(2)  # (R, K)
            best = {c: int(mean_score[:, i].argmax()) for i, c in enumerate(classes)}

        ids = sample_ids(labels)
        rows = torch.tensor([best[c] * len(classes) + classes.index(c) for c, _ in ids], device=dev)
        eps = latent.initial_latents(zd, seed, ids, dev, stream=latent.STREAM_SAMPLE)  # (N, zd)
        z = mu[rows] + torch.exp(0.5 * logvar[rows]) * eps
        with torch.no_grad():
            images = G.to_unit(G(z)).clamp(0, 1)
        scores = latent.label_scores(T, images, labels.to(dev))
        return AttackOutput(images=images.cpu(), labels=labels, scores=scores,
                            extras={"mu": mu[rows].cpu(), "logvar": logvar[rows].cpu()})
