"""PPA attack (Struppek et al., ICML 2022, "Plug & Play Attacks").

Notation: G a generator pretrained on public data (images ``G.to_unit(G(z))`` in [0, 1]), T the
target, y a target class, conf_y(x) = softmax(T(x))_y. PROTOCOL.md §4 defaults in brackets.

1. Initial selection. One pool of ``candidates`` [5000] latents z ~ N(0, I), shared by all classes,
   is scored once: conf(x) is the mean of softmax(T(x)) and softmax(T(hflip(x))) (the official
   candidate search flips, and clips the images to the valid range). For each class y the ``keep``
   [200] pool members with the highest conf_y are its candidates (rank k = 0 is the best; ties keep
   the lower pool index). Different classes may pick the same pool member, as in the official code.
2. Optimisation. Every candidate latent is optimised with Adam (``lr`` [0.005], ``betas`` [(0.1, 0.1)])
   for ``iterations`` [70] steps on the Poincaré loss of T on a random resized crop of G(z)
   (official attack transform: relative area U(0.9, 1.0), aspect ratio 1, no flip, images not clipped):

       L(z) = d_Poincare(T(rrc(G(z))), y),   d = arccosh(1 + 2|u - v|^2 / ((1 - |u|^2)(1 - |v|^2)))

   with u the L1-normalised logits and v the one-hot of y minus xi = 1e-4 (the official xi). The loss
   depends on the direction of the logits only, so it drives the other logits towards 0 rather than
   maximising conf_y; with very long runs conf_y can fall again (seen on small MNIST classifiers).
3. Final selection. Each optimised candidate gets its mean conf_y over ``final_transforms`` [100]
   random transforms (official: random resized crop with area ``crop_scale`` [(0.5, 0.9)] and aspect
   ratio U_log(0.8, 1.2), then a horizontal flip with probability 0.5); the M requested images of
   class y are its M best candidates in that order (M <= keep; paper: 50 of 200).

Scale note: at paper scale G is a pretrained StyleGAN2 (FFHQ / MetFaces / AFHQ) and the optimised
variable is one style vector w, obtained from z by the truncated mapping network (psi 0.5), with
images centre-cropped and resized for T. The package's CPU-scale prior is the public-data DCGAN of
``gan_wgangp`` (PROTOCOL.md §4: "at 64 px a GAN trained on public data stands in"); it has no mapping
network, so the pool is sampled and optimised directly in z, without truncation or cropping.

Batching and reproducibility: the pool is drawn from ``sample_generator(seed, POOL_ID)`` and does not
depend on the requested labels; the optimisation and final-selection transforms of candidate
(class y, rank k) come from ``sample_generator(seed, y, k, stream)`` (stream 1 and 3), and are drawn
per image, whereas the official code draws one transform per batch (a batch-independence change; the
distribution of each image's transform is the same). The loss is the sum of per-image terms over the
configured ``batch_size`` and Adam acts per coordinate, so a class's result does not depend on the
classes requested with it. Random resized crops whose side would exceed the image (possible with
aspect ratio != 1) are clipped to the full side instead of torchvision's redraw-then-centre-crop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmi_ray.attacks import latent
from diffmi_ray.attacks.base import Attack, AttackOutput, batches, register, sample_ids
from diffmi_ray.attacks.gmi import load_prior
from diffmi_ray.attacks.losses import poincare_loss
from diffmi_ray.config.methods import PPAAttackConfig
from diffmi_ray.conventions import sample_generator
from diffmi_ray.errors import UserError

#: the official code's constants that the config does not expose
POOL_ID = 0x504F4F4C            # key of the candidate pool's generator: sample_generator(seed, POOL_ID)
SELECTION_FLIP = True           # initial selection averages over x and hflip(x)
OPT_CROP_SCALE = (0.9, 1.0)     # attack transform: RandomResizedCrop(scale=(0.9, 1.0), ratio=(1, 1))
OPT_CROP_RATIO = (1.0, 1.0)
FINAL_CROP_RATIO = (0.8, 1.2)   # final selection: RandomResizedCrop(scale=crop_scale, ratio=(0.8, 1.2))
FINAL_FLIP_P = 0.5              #                  + RandomHorizontalFlip(0.5)
POINCARE_XI = 1e-4
#: uniform draws one random resized crop (+ flip) consumes: area, log-ratio, x, y, flip
RRC_DRAWS = 5


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------


def random_resized_crop(x: Tensor, u: Tensor, scale: tuple[float, float], ratio: tuple[float, float] = (1.0, 1.0),
                        flip_p: float = 0.0) -> Tensor:
    """Per-image random resized crop (+ optional horizontal flip), differentiable in x.

    x (B, C, H, W); u (B, RRC_DRAWS) uniform draws in [0, 1): relative area s ~ U(scale) (u0), aspect
    ratio r = w/h log-uniform in ``ratio`` (u1), crop centre uniform over the valid positions (u2, u3),
    flip if u4 < flip_p. Crop width sqrt(s r) and height sqrt(s / r) (fractions of W, H, clipped to 1);
    the crop window is resampled bilinearly back to H x W (torchvision's RandomResizedCrop geometry;
    samples at the window's edge blend with the pixel just outside it, where torchvision's crop-then-
    resize replicates the edge).
    """
    B, C, H, W = x.shape
    u = u.to(device=x.device, dtype=x.dtype)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lr0 + (lr1 - lr0) * u[:, 1])
    w = torch.sqrt(s * r).clamp(max=1.0)  # fraction of the width
    h = torch.sqrt(s / r).clamp(max=1.0)
    cx = (2.0 * u[:, 2] - 1.0) * (1.0 - w)  # normalised centre, crop stays inside the image
    cy = (2.0 * u[:, 3] - 1.0) * (1.0 - h)
    flip = torch.where(u[:, 4] < flip_p, -1.0, 1.0).to(x.dtype)
    zero = torch.zeros_like(w)
    mat = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(mat, [B, C, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------------------------
# the three steps
# ----------------------------------------------------------------------------------------------


def candidate_pool(z_dim: int, candidates: int, seed: int) -> Tensor:
    """The shared pool of candidate latents (candidates, z_dim) on CPU, from (seed, POOL_ID) only."""
    return torch.randn(candidates, z_dim, generator=sample_generator(seed, POOL_ID))


@torch.no_grad()
def pool_confidences(G: nn.Module, T: nn.Module, pool: Tensor, batch_size: int, device: torch.device | str = "cpu",
                     flip: bool = SELECTION_FLIP) -> Tensor:
    """softmax(T(x)) of every pool image, averaged with its h-flip when ``flip``: (candidates, classes) on CPU."""
    out = []
    for s in range(0, len(pool), batch_size):
        x = G.to_unit(G(pool[s:s + batch_size].to(device))).clamp(0.0, 1.0)
        views = [x, x.flip(-1)] if flip else [x]
        out.append(sum(T(v).softmax(-1) for v in views).div(len(views)).float().cpu())
    return torch.cat(out)


def initial_selection(conf: Tensor, classes: list[int], keep: int) -> Tensor:
    """Pool indices (len(classes), keep) of each class's ``keep`` most confident candidates, best first.

    conf (candidates, num_classes). Ties keep the lower pool index. Raises UserError if keep > candidates.
    """
    if keep > conf.shape[0]:
        raise UserError(f"ppa: keep={keep} exceeds the {conf.shape[0]} candidates")
    cols = conf[:, classes].T  # (K, candidates)
    return torch.sort(cols, dim=1, descending=True, stable=True).indices[:, :keep]


@torch.no_grad()
def transform_scores(T: nn.Module, images: Tensor, y: Tensor, u: Tensor, crop_scale: tuple[float, float],
                     batch_size: int) -> Tensor:
    """Mean conf_y over random transforms: images (B, C, H, W) [0,1], y (B,), u (B, n_t, RRC_DRAWS) -> (B,) CPU."""
    out = []
    for s in range(0, len(images), batch_size):
        x, yy, uu = images[s:s + batch_size], y[s:s + batch_size], u[s:s + batch_size]
        acc = torch.zeros(len(x), device=x.device)
        for t in range(uu.shape[1]):
            xt = random_resized_crop(x, uu[:, t], crop_scale, FINAL_CROP_RATIO, FINAL_FLIP_P)
            acc += T(xt).softmax(-1).gather(1, yy.view(-1, 1)).squeeze(1).float()
        out.append((acc / uu.shape[1]).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def final_selection(scores: Tensor, m: int) -> Tensor:
    """Indices of the ``m`` highest scores in descending order (ties: lower index): scores (keep,) -> (m,)."""
    return torch.sort(scores, descending=True, stable=True).indices[:m]


@register
class PPAAttack(Attack):
    name = "ppa"
    config_cls = PPAAttackConfig

    def __init__(self, config, inputs):
        super().__init__(config, inputs)
        self.G, _, self.meta = load_prior(inputs, need_discriminator=False, method=self.name)
        self._pool: dict[int, tuple[Tensor, Tensor]] = {}  # seed -> (pool latents, confidences)

    def pool(self, seed: int) -> tuple[Tensor, Tensor]:
        """(pool latents (candidates, z_dim), pool confidences (candidates, classes)) for ``seed``, cached."""
        if seed not in self._pool:
            cfg: PPAAttackConfig = self.config
            z = candidate_pool(self.G.z_dim, cfg.candidates, seed)
            conf = pool_confidences(self.G, self.inputs.target, z, cfg.batch_size, self.device)
            self._pool = {seed: (z, conf)}
        return self._pool[seed]

    def invert(self, labels: torch.Tensor, seed: int) -> AttackOutput:
        cfg: PPAAttackConfig = self.config
        G, T, dev = self.G, self.inputs.target, self.device
        labels = labels.long().cpu()
        classes = list(dict.fromkeys(labels.tolist()))
        counts = {c: int((labels == c).sum()) for c in classes}
        too_many = {c: m for c, m in counts.items() if m > cfg.keep}
        if too_many:
            raise UserError(f"ppa: {too_many} images requested for classes that keep only {cfg.keep} candidates")

        # 1. initial selection from the shared pool
        pool, conf = self.pool(seed)
        idx = initial_selection(conf, classes, cfg.keep)  # (K, keep)
        rows = [(c, k) for c in classes for k in range(cfg.keep)]  # candidate (class, rank) keys, class-major
        z0 = pool[idx.reshape(-1)]  # (K*keep, z_dim)
        init_conf = torch.stack([conf[idx[i], c] for i, c in enumerate(classes)]).reshape(-1)
        y = torch.tensor([c for c, _ in rows], dtype=torch.long)

        # 2. Poincaré-loss optimisation under random resized crops, per-image transform streams
        u_opt = latent.per_sample_uniform((cfg.iterations, RRC_DRAWS), seed, rows, latent.STREAM_AUG)
        z_opt = torch.empty_like(z0)
        for sl in batches(len(rows), cfg.batch_size):
            z = z0[sl].clone().to(dev).requires_grad_(True)
            yb, ub = y[sl].to(dev), u_opt[sl]

            def loss_fn(i: int, z=z, yb=yb, ub=ub) -> Tensor:
                x = G.to_unit(G(z))  # the official attack does not clip before the transforms
                logits = T(random_resized_crop(x, ub[:, i], OPT_CROP_SCALE, OPT_CROP_RATIO))
                return latent.per_sample_scale(poincare_loss(logits, yb, eps=POINCARE_XI), len(yb), cfg.batch_size)

            opt = torch.optim.Adam([z], lr=cfg.lr, betas=tuple(cfg.betas))
            latent.optimise([z], opt, loss_fn, cfg.iterations, name="PPA Poincare loss")
            z_opt[sl] = z.detach().cpu()

        # 3. final selection by mean confidence over random transforms
        u_fin = latent.per_sample_uniform((cfg.final_transforms, RRC_DRAWS), seed, rows, latent.STREAM_EVAL)
        with torch.no_grad():
            cand = torch.cat([G.to_unit(G(z_opt[sl].to(dev))).clamp(0.0, 1.0)
                              for sl in batches(len(rows), cfg.batch_size)])  # (K*keep, C, H, W)
        sel_scores = transform_scores(T, cand, y.to(dev), u_fin, tuple(cfg.crop_scale), cfg.batch_size)
        chosen: dict[int, Tensor] = {}
        for i, c in enumerate(classes):
            chosen[c] = i * cfg.keep + final_selection(sel_scores[i * cfg.keep:(i + 1) * cfg.keep], counts[c])

        pick = torch.tensor([int(chosen[c][j]) for c, j in sample_ids(labels)])  # row of each request
        images = cand[pick.to(cand.device)].cpu()
        scores = latent.label_scores(T, images.to(dev), labels.to(dev))
        return AttackOutput(images=images, labels=labels, scores=scores,
                            extras={"z": z_opt[pick], "rank": pick % cfg.keep,
                                    "pool_index": idx.reshape(-1)[pick], "initial_confidence": init_conf[pick],
                                    "selection_score": sel_scores[pick]})

