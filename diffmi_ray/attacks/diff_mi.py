"""Diff-MI step 2: iterative image reconstruction (IIR) with a CDM prior, re-noise + DDIM, targeted PGD.

Paper §III-B.2 (eq. 4-5) and PROTOCOL.md §3 "Step 2". For a batch of target labels y (all pixel
tensors in the diffusion space [-1, 1] unless said otherwise)::

    x0 ~ N(0, I)                                   a free pixel tensor, optimised by Adamax(lr)
    for i = 0 .. N-1, t_i from :func:`iir_timesteps` (annealed ~T-1 -> ~T/5, integer jitter):
      (a) prior step   eps ~ N(0, I);  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
                       L_prior = || eps - eps_w(x_t, y, t_i) ||^2          eps_w: CFG, weight w
                       g = dL_prior/dx0 (the U-Net is frozen); track = EMA of ||g|| ; Adamax step
      (b) attack step  v = aug_k((x0 + 1) / 2) clamped to [0, 1], k = 1..aug_copies
                       L_cls(T(v), y) (top-k + alpha p-reg | CE | max-margin), labels tiled
                       g = dL_cls/dx0 clipped to norm clip_factor * track ; Adamax step
    x_r = q_sample(x0, renoise_t) ; x0 = DDIM(x_r -> clean, ddim_steps, eta, CFG w)
    image = (clamp(x0, -1, 1) + 1) / 2 ; image = PGD_L2(T, image, y)   (if enabled)

Latent CDMs (Table VI): x0 lives in the first-stage autoencoder's scaled latent space; the prior
step, the re-noise and the DDIM run there unchanged, and ``decode(x0)`` (frozen, differentiable,
resized to the target's image size) replaces x0 wherever T looks at it (the attack step and the
final image); gradient clipping then acts on the latent gradient.

Batch independence: every random draw of a sample (its initial x0, each iteration's eps, the
augmentation parameters of its copies, the re-noise and DDIM noise, the PGD start) comes from its
own generator ``sample_generator(seed, class, repeat)``, the losses are sums over samples of
per-sample means, and the gradient-norm tracking and clipping are per sample; the t schedule is one
sequence per seed. So an image depends on (seed, class, repeat) only, not on its batch-mates.

Where we differ from the official code (3_attack/attack.py; PROTOCOL.md §6) and why no option
reproduces it:

* Timesteps are 0-based: the official loop draws t in 1..1000, noises with abar[t-1] and feeds the
  U-Net t; we noise with abar[t-1] too but feed t-1 (the index the CDM was trained with). Its final
  DDIM noises to abar[99] but its first step treats the state as abar[91] and feeds time 100, and its
  last step ends at abar[0] with noise; we run 99, 89, ..., 9 -> clean, each step with matching
  model time and abar. Both are shifts of at most 8 of 1000 noise levels (the last one adds noise of
  std ~0.007 in [-1, 1]): no measurable change, so no option.
* Gradient-norm tracking and clipping are per sample (official: one norm over the whole batch
  tensor), which makes an image independent of its batch; on a batch of similar images the two agree
  up to the sqrt(B) factor that both sides of the comparison share.
* Augmentations act on the [0, 1] image (official: on the [-1, 1] tensor, where kornia's ColorJitter
  clamps to [0, 1] first). Flip and blur commute with the affine map; only the brightness factor
  (multiplicative, U(0.8, 1.2), p = 0.5) acts on a different range. Parameters are drawn per sample
  and copy from the sample's generator; flip, jitter and blur (kornia ``gaussian_blur2d``, 7x7,
  sigma 3, reflect border) are applied in that order, as the official ``ImageSequential``.
* The t jitter is one deterministic sequence per seed (official: the global NumPy RNG per batch).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from diffmi_ray.attacks.base import Attack, AttackInputs, AttackOutput, batches, register, sample_ids
from diffmi_ray.attacks.losses import l_cls
from diffmi_ray.attacks.pgd import pgd_l2
from diffmi_ray.config.methods import DiffMIAttackConfig
from diffmi_ray.conventions import from_pm1, sample_generator
from diffmi_ray.diffusion import CFGModel, ddim_sample, ddim_timesteps, q_sample
from diffmi_ray.errors import UserError

__all__ = ["DiffMIAttack", "iir_timesteps_1000", "iir_timesteps", "to_model_time", "augment"]

_T_REF = 1000  # the schedule's reference number of diffusion steps (t_max, t_min, jitter, renoise_t)
_SCHEDULE_STREAM = 0x7153  # id of the t-jitter generator (independent of every (class, repeat) stream)


# ----------------------------------------------------------------------------------------------
# the annealed time schedule


def iir_timesteps_1000(n: int, t_max: float = 1000.0, t_min: float = 200.0, jitter: int = 50,
                       generator: torch.Generator | None = None) -> list[int]:
    """The official IIR schedule in 1-based steps of a T = 1000 model (values in 1..1000).

    t_i = ((n-i)/1.5 + (n-i)/3 * cos(3 i / (10 pi))) / n * (t_max - t_min) + t_min,  i = 0..n-1,
    plus an integer drawn uniformly from [-jitter, jitter] (``generator``), truncated to an integer
    and clipped to [1, 1000]. With the defaults t_0 = 1000 and t_{n-1} is a little above 200
    (209 for n = 30). jitter = 0 (or no generator with jitter 0) gives the deterministic part.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 iterations, got {n}")
    if jitter and generator is None:
        raise ValueError("a jittered schedule needs a generator")
    out = []
    for i in range(n):
        r = n - i
        t = (r / 1.5 + r / 3.0 * math.cos(3.0 / (10.0 * math.pi) * i)) / n * (t_max - t_min) + t_min
        if jitter:
            t += int(torch.randint(-jitter, jitter + 1, (), generator=generator))
        out.append(int(min(max(math.trunc(t), 1), _T_REF)))
    return out


def to_model_time(t_1000: int, num_timesteps: int) -> int:
    """A 1-based step of the T = 1000 reference (1..1000) -> the 0-based step of a T-step model.

    ceil(t * T / 1000) - 1, clipped to [0, T-1]; for T = 1000 simply t - 1 (the official noise level
    abar[t-1] at the index the CDM was trained with).
    """
    t = math.ceil(t_1000 * num_timesteps / _T_REF) - 1
    return int(min(max(t, 0), num_timesteps - 1))


def iir_timesteps(n: int, num_timesteps: int = 1000, t_max: float = 1000.0, t_min: float = 200.0,
                  jitter: int = 50, generator: torch.Generator | None = None) -> list[int]:
    """0-based IIR timesteps of a ``num_timesteps``-step model: :func:`iir_timesteps_1000` then
    :func:`to_model_time`. Defaults (T = 1000, n = 30, no jitter): 999, ..., 208."""
    return [to_model_time(t, num_timesteps) for t in iir_timesteps_1000(n, t_max, t_min, jitter, generator)]


# ----------------------------------------------------------------------------------------------
# per-sample noise and augmentation


class _SampleRNG:
    """One CPU generator per sample, keyed by (seed, class, repeat); draws are stacked over the batch."""

    def __init__(self, seed: int, ids: Sequence[tuple[int, int]], device: torch.device):
        self.gens = [sample_generator(seed, c, j) for c, j in ids]
        self.device = device

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self.gens]).to(self.device)


def augment(v: torch.Tensor, params: torch.Tensor, *, brightness: float = 0.2, p_jitter: float = 0.5,
            p_blur: float = 0.5, blur_kernel: int = 7, blur_sigma: float = 3.0) -> torch.Tensor:
    """Differentiable augmentation of [0, 1] images v (B, C, H, W) with per-sample parameters.

    params (B, 4) of U(0, 1) draws: [flip, jitter on, jitter factor, blur on]. Horizontal flip if
    params[:, 0] < 0.5; brightness x f with f = 1 + brightness * (2 u - 1) if params[:, 1] < p_jitter;
    Gaussian blur (blur_kernel, sigma blur_sigma, reflect border) if params[:, 3] < p_blur. No clamping.
    """
    from kornia.filters import gaussian_blur2d

    view = (-1, 1, 1, 1)
    flip = (params[:, 0] < 0.5).view(view)
    v = torch.where(flip, v.flip(-1), v)
    factor = 1.0 + brightness * (2.0 * params[:, 2] - 1.0)
    factor = torch.where(params[:, 1] < p_jitter, factor, torch.ones_like(factor)).view(view)
    v = v * factor.to(v.dtype)
    blur = (params[:, 3] < p_blur).view(view)
    if bool(blur.any()):
        blurred = gaussian_blur2d(v, (blur_kernel, blur_kernel), (blur_sigma, blur_sigma), border_type="reflect")
        v = torch.where(blur, blurred, v)
    return v


# ----------------------------------------------------------------------------------------------
# the attack


@register
class DiffMIAttack(Attack):
    """Diff-MI's IIR attack on a (pretrained or fine-tuned) CDM; see the module docstring.

    ``inputs.generator_dir`` is a CDM artifact (``unet.pt`` + ``model.json``, :mod:`diffmi_ray.training.cdm`);
    ``inputs.pseudo_labels_dir`` supplies the p-reg centroids (needed for ``loss: topk_preg`` with alpha > 0).
    """

    name = "diff_mi"
    config_cls = DiffMIAttackConfig

    def __init__(self, config: DiffMIAttackConfig | dict, inputs: AttackInputs):
        super().__init__(config, inputs)
        from diffmi_ray.training.cdm import load, load_codec

        cfg: DiffMIAttackConfig = self.config
        self.unet, self.sched, self.meta = load(inputs.generator_dir, self.device, trainable=False)
        self.codec = load_codec(inputs.generator_dir, self.meta, self.device)
        self.x_shape = (int(self.meta["channels"]), int(self.meta["image_size"]), int(self.meta["image_size"]))
        shape = self.x_shape if self.codec is None else (
            self.codec.pixel_channels, self.codec.output_size, self.codec.output_size)
        if shape != tuple(inputs.image_shape):
            raise UserError(f"the CDM in {inputs.generator_dir} makes {shape} images, the target takes "
                            f"{tuple(inputs.image_shape)}")
        if int(self.meta["num_classes"]) != inputs.num_classes:
            raise UserError(f"the CDM has {self.meta['num_classes']} classes, the target {inputs.num_classes}")
        if cfg.loss == "topk_preg" and not cfg.k < inputs.num_classes:
            raise UserError(f"attack.k = {cfg.k} must be smaller than the number of classes ({inputs.num_classes})")
        self.eps_model = CFGModel(self.unet, cfg.guidance, null_label=int(self.meta["num_classes"]))
        self.centroids = None
        if cfg.loss == "topk_preg" and cfg.alpha > 0:
            if inputs.pseudo_labels_dir is None:
                raise UserError("diff_mi with loss topk_preg and alpha > 0 needs the pseudo-label centroids "
                                "(pseudo_labels parent)")
            from diffmi_ray.pipeline.stages.pseudo_labels import load_pseudo_labels

            self.centroids = load_pseudo_labels(inputs.pseudo_labels_dir)["centroids"].to(self.device)
        self.T = self.sched.num_timesteps

    # -------------------------------------------------------------- public API
    def invert(self, labels: torch.Tensor, seed: int) -> AttackOutput:
        """One image per label (N,), in [0, 1]; deterministic given seed, independent of batching."""
        labels = labels.detach().cpu().long()
        ids = sample_ids(labels)
        ts = self.timesteps(seed)
        images, scores, prior_losses, cls_losses = [], [], [], []
        for sl in batches(len(labels), self.config.batch_size):
            img, score, lp, lc = self._invert_batch(labels[sl], ids[sl], seed, ts)
            images.append(img)
            scores.append(score)
            prior_losses.append(lp)
            cls_losses.append(lc)
        return AttackOutput(images=torch.cat(images), labels=labels, scores=torch.cat(scores),
                            extras={"timesteps": ts, "final_prior_loss": torch.cat(prior_losses),
                                    "final_cls_loss_per_batch": cls_losses})

    def timesteps(self, seed: int) -> list[int]:
        """The 0-based t_i of this seed (shared by every batch)."""
        cfg = self.config
        return iir_timesteps(cfg.iterations, self.T, cfg.t_max, cfg.t_min, cfg.t_jitter,
                             sample_generator(seed, _SCHEDULE_STREAM))

    # -------------------------------------------------------------- one batch
    def _target_outputs(self, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        target = self.inputs.target
        if self.centroids is None:
            return None, target(v)
        if hasattr(target, "features_and_logits"):
            return target.features_and_logits(v)
        return target.features(v), target(v)

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """x0 in the diffusion space -> the image in [-1, 1] space (decoded for a latent CDM)."""
        return x if self.codec is None else self.codec.decode(x)

    def _invert_batch(self, y: torch.Tensor, ids, seed: int, ts: list[int]):
        cfg = self.config
        dev = self.device
        B = len(y)
        C, H, W = self.x_shape
        rng = _SampleRNG(seed, ids, dev)
        y = y.to(dev)
        y_tiled = y.repeat(cfg.aug_copies)  # [y0..yB-1, y0..yB-1, ...] (official tiling)

        x = rng.randn(C, H, W).requires_grad_(True)  # x0 ~ N(0, I) in the [-1, 1] space
        opt = torch.optim.Adamax([x], lr=cfg.lr)
        track = torch.zeros(B, device=dev)
        loss_prior, loss_cls = torch.zeros(B), 0.0
        for i, t in enumerate(ts):
            # (a) prior step: L_prior = ||eps - eps_w(x_t, y, t)||^2, per-sample means summed
            eps = rng.randn(C, H, W)
            x_t = q_sample(self.sched, x, t, eps)
            t_vec = torch.full((B,), t, device=dev, dtype=torch.long)
            per_prior = (self.eps_model(x_t, t_vec, y) - eps).pow(2).flatten(1).mean(1)  # (B,)
            opt.zero_grad(set_to_none=True)
            per_prior.sum().backward()
            with torch.no_grad():
                norm = x.grad.flatten(1).norm(dim=1)
                track = norm if i == 0 else cfg.clip_ema * track + (1.0 - cfg.clip_ema) * norm
            opt.step()

            # (b) attack step on aug_copies augmented copies; L_cls is a mean over B * copies rows,
            # times B = sum over samples of the per-sample mean over copies
            params = torch.cat([rng.rand(4) for _ in range(cfg.aug_copies)])  # (copies * B, 4), copy-major
            v = augment(from_pm1(self._pixels(x)).repeat(cfg.aug_copies, 1, 1, 1), params).clamp(0.0, 1.0)
            feats, logits = self._target_outputs(v)
            loss = l_cls(logits, y_tiled, loss=cfg.loss, k=cfg.k, alpha=cfg.alpha, features=feats,
                         centroids=self.centroids) * B
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                g = x.grad
                gnorm = g.flatten(1).norm(dim=1)
                coef = (cfg.clip_factor * track / (gnorm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_ per sample
                g.mul_(coef.view(-1, 1, 1, 1))
            opt.step()
            loss_prior = per_prior.detach().cpu()
            loss_cls = float(loss.detach()) / B

        with torch.no_grad():
            x0 = x.detach()
            if cfg.renoise_t > 0:
                t_start = to_model_time(cfg.renoise_t, self.T)
                x_r = q_sample(self.sched, x0, t_start, rng.randn(C, H, W))
                noise = [rng.randn(C, H, W) for _ in range(cfg.ddim_steps)] if cfg.ddim_eta > 0 else None
                x0 = ddim_sample(self.eps_model, self.sched, x_r, ddim_timesteps(t_start, cfg.ddim_steps), y,
                                 eta=cfg.ddim_eta, noise=noise)
            img = from_pm1(self._pixels(x0).clamp(-1.0, 1.0))
        if cfg.pgd.enabled:
            img = pgd_l2(self.inputs.target, img, y, cfg.pgd.eps, cfg.pgd.step_size, cfg.pgd.iterations,
                         cfg.pgd.random_start, generator=rng.gens)
        img = img.clamp(0.0, 1.0).detach()
        with torch.no_grad():
            score = self.inputs.target(img).softmax(-1).gather(1, y.view(-1, 1)).squeeze(1)
        return img.cpu(), score.cpu(), loss_prior, loss_cls
