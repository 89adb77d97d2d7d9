"""VMI attack (Wang et al., NeurIPS 2021, "Variational Model Inversion Attacks").

Notation: G the public-data generator (images ``G.to_unit(G(z))`` in [0, 1]), T the target, y a target
class, q_y a normalising flow over the latent z (:class:`~diffmi_ray.models.flows.GlowVectorFlow`:
``flow_levels`` L levels of ``flow_steps`` K Glow steps, width-100 additive couplings, shuffle
permutations, actnorm -- the official run's flow). For every requested class y, q_y starts as exactly
N(0, I) (the GAN prior) and is fitted by SGD (lr, momentum; PROTOCOL.md §4: 1e-4, 0.9, batch 64,
~4.9k steps per class) on the variational objective::

    L(q_y) = E_{z ~ q_y}[CE(T(G(z)), y)] + lambda_kl * KL(q_y || N(0, I))            (lambda_kl = 1e-3)

Both expectations are Monte-Carlo estimates over ``batch_size`` reparameterised samples z = q_y(eps),
eps ~ N(0, I); as in the official code the KL uses its own fresh batch, estimated as
mean[log q_y(z) - log N(z; 0, I)] (:func:`~diffmi_ray.models.flows.kl_to_standard_normal`). The
reconstructions are samples of the fitted flows: the j-th image of class y is G(q_y(eps_{y,j})).

Scale note: at paper scale VMI's generator is a StyleGAN2 and its variational family is one flow per
w-layer ("layeredflow": per layer l a flow over z whose sample goes through the mapping network to
w_l; the KL term is averaged over the layers). The package's CPU-scale prior is the public-data DCGAN
of ``gan_wgangp`` (PROTOCOL.md §4 allows "StyleGAN2 64 px (or DCGAN)"), which has a single latent
vector, so there is a single flow per class over z; the StyleGAN2 variant is not implemented.

Batching and reproducibility: each class has its own flow (constructed from
``sample_generator(seed, y, 0)``) and its own step-noise stream ``sample_generator(seed, y, 2)``; the
flows of the classes in one call are trained together (one G / T pass over all their samples), but the
loss is a sum of per-class terms over disjoint parameter sets, so SGD updates each flow exactly as if
it were trained alone: a class's result does not depend on which classes share the call (up to
floating-point batching effects of G and T). Output noise of (class y, repeat j) comes from
``sample_generator(seed, y, j, 4)``. G and T run in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmi_ray.attacks import latent
from diffmi_ray.attacks.base import Attack, AttackOutput, register, sample_ids
from diffmi_ray.attacks.gmi import load_prior
from diffmi_ray.config.methods import VMIAttackConfig
from diffmi_ray.conventions import sample_generator
from diffmi_ray.models.flows import GlowVectorFlow, kl_to_standard_normal

#: the official run's flow options that the config does not expose
FLOW_HIDDEN = 100
FLOW_COUPLING = "additive"
FLOW_PERMUTATION = "shuffle"
FLOW_ACTNORM = True


def build_flow(z_dim: int, cfg: VMIAttackConfig, seed: int, c: int) -> GlowVectorFlow:
    """Class c's flow q_c over R^z_dim, exactly N(0, I) at construction, built from (seed, c) only."""
    flow_seed = sample_generator(seed, c, latent.STREAM_INIT).initial_seed()
    return GlowVectorFlow(z_dim, K=cfg.flow_steps, L=cfg.flow_levels, hidden=FLOW_HIDDEN, coupling=FLOW_COUPLING,
                          permutation=FLOW_PERMUTATION, actnorm=FLOW_ACTNORM, seed=flow_seed)


@dataclass
class FitResult:
    """Fitted flows (one per class, in ``classes`` order) and per-step loss terms, each (steps, K) on CPU:
    ``loss = ce + lambda_kl * kl``."""

    classes: list[int]
    flows: nn.ModuleList
    loss: Tensor
    ce: Tensor
    kl: Tensor


def fit_flows(G: nn.Module, T: nn.Module, classes: list[int], seed: int, cfg: VMIAttackConfig,
              device: torch.device | str = "cpu", log=None) -> FitResult:
    """Fit one flow per class in ``classes`` for ``cfg.steps`` SGD steps on CE + lambda_kl * KL.

    G: generator with ``z_dim`` and ``to_unit`` (frozen, eval). T: target taking [0, 1] images.
    Raises FloatingPointError when the loss becomes non-finite.
    """
    K, n, zd = len(classes), cfg.batch_size, G.z_dim
    flows = nn.ModuleList(build_flow(zd, cfg, seed, c) for c in classes).to(device)
    gens = [sample_generator(seed, c, latent.STREAM_EPS) for c in classes]
    y = torch.tensor(classes, dtype=torch.long).repeat_interleave(n).to(device)  # (K*n,)
    hist = {k: torch.zeros(cfg.steps, K) for k in ("loss", "ce", "kl")}

    def loss_fn(i: int) -> Tensor:
        zs, kls = [], []
        for flow, g in zip(flows, gens):
            eps_ce = torch.randn(n, zd, generator=g)
            eps_kl = torch.randn(n, zd, generator=g)  # the official code's separate KL batch
            z, _ = flow(eps_ce.to(device))
            zk, log_q = flow(eps_kl.to(device))
            zs.append(z)
            kls.append(kl_to_standard_normal(zk, log_q))
        x = G.to_unit(G(torch.cat(zs))).clamp(0.0, 1.0)  # (K*n, C, H, W); the official code clamps too
        ce = F.cross_entropy(T(x), y, reduction="none").view(K, n).mean(1)  # (K,)
        kl = torch.stack(kls)  # (K,)
        per_class = ce + cfg.lambda_kl * kl
        hist["loss"][i], hist["ce"][i], hist["kl"][i] = per_class.detach().cpu(), ce.detach().cpu(), kl.detach().cpu()
        return per_class.sum()  # disjoint parameters: each flow gets its own class's gradient

    opt = torch.optim.SGD(flows.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    latent.optimise(flows.parameters(), opt, loss_fn, cfg.steps, name="VMI loss", log=log,
                    log_every=max(1, cfg.steps // 10) if log is not None else 0)
    for p in flows.parameters():
        p.requires_grad_(False)
    return FitResult(classes=list(classes), flows=flows.eval(), **hist)


@register
class VMIAttack(Attack):
    name = "vmi"
    config_cls = VMIAttackConfig

    def __init__(self, config, inputs):
        super().__init__(config, inputs)
        self.G, _, self.meta = load_prior(inputs, need_discriminator=False, method=self.name)

    def invert(self, labels: torch.Tensor, seed: int) -> AttackOutput:
        cfg: VMIAttackConfig = self.config
        G, T, dev = self.G, self.inputs.target, self.device
        labels = labels.long().cpu()
        classes = list(dict.fromkeys(labels.tolist()))  # first-appearance order
        fit = fit_flows(G, T, classes, seed, cfg, dev, log=self.inputs.log)

        ids = sample_ids(labels)
        eps = latent.initial_latents(G.z_dim, seed, ids, dev, stream=latent.STREAM_SAMPLE)  # (N, z_dim)
        z = torch.empty_like(eps)
        with torch.no_grad():
            for k, c in enumerate(classes):
                rows = (labels == c).nonzero(as_tuple=True)[0].to(dev)
                z[rows] = fit.flows[k](eps[rows])[0]
            images = G.to_unit(G(z)).clamp(0.0, 1.0)
        scores = latent.label_scores(T, images, labels.to(dev))
        last = {c: (float(fit.ce[-1, k]), float(fit.kl[-1, k])) for k, c in enumerate(classes)}
        return AttackOutput(images=images.cpu(), labels=labels, scores=scores,
                            extras={"z": z.cpu(), "final_ce": torch.tensor([last[c][0] for c in labels.tolist()]),
                                    "final_kl": torch.tensor([last[c][1] for c in labels.tolist()])})
