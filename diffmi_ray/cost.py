"""Compute cost of a planned grid: FLOPs counted per network, GPU-hours from a sustained throughput.

Units: FLOPs are floating-point operations with torch's :class:`~torch.utils.flop_counter.FlopCounterMode`
convention (a multiply-add is 2 FLOPs; matmuls, convolutions and attention are counted, element-wise
ops, norms and optimiser updates are not); throughput in FLOP/s; time in seconds or GPU-hours.

Model
-----
Every unique stage instance of a planned grid (:func:`diffmi_ray.pipeline.plan.plan_grid`) costs a sum
of named :class:`Term` s, each ``examples x forward FLOPs per example of one network x a pass factor``:

* forward only: 1;
* a training step of the network's weights: ``1 + BACKWARD_FACTOR`` (= 3);
* forward + backward through a FROZEN network to its input (attacks optimise latents or pixels, the
  fine-tuning back-propagates through a mostly frozen U-Net): ``1 + INPUT_GRAD_FACTOR`` (= 2).

Forward FLOPs per example are counted exactly, once per (network, constructor keywords, input shape),
by running the real model built with the stages' own constructors at batch 1 on ``meta`` tensors (no
compute; real CPU tensors when an op has no meta kernel). GPU-hours = FLOPs / sustained FLOP/s / 3600.
The sustained FLOP/s is an assumption (:data:`DEFAULT_SUSTAINED_TFLOPS`) or a measurement of real
training steps on the current device (:func:`measure_sustained_flops`), in the same FLOP units, so a
measured figure absorbs what the count leaves out (element-wise ops, data loading, small batches).

Per-stage formulas (module functions below, each documented): ``split`` costs 0;
``train_classifier`` epochs over the private train split (+ test accuracy per epoch, BiDO kernels);
``pseudo_labels`` T over the public set; ``train_prior`` the CDM's ``iterations x batch`` U-Net steps
(+ the latent autoencoder) or a GAN's iterations x (n_critic D steps + a G step);
``finetune_cdm`` probe + ``max_epochs`` epochs of the differentiable sampler (:data:`FINETUNE_EPOCHS`);
``attack`` the method's optimisation per image / class; ``evaluate`` the feature networks over the
reconstructions and the private references.

Dataset sizes: packaged (offline) datasets are split for real (:func:`diffmi_ray.data.splits.make_split`);
folder datasets, absent at paper scale, take the paper's counts (:data:`PAPER_DATASETS`) capped by the
config's ``max_images`` / ``max_per_class``.

No Ray here: this module only reads configs and builds models.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffmi_ray.config.experiment import STAGES

__all__ = ["BACKWARD_FACTOR", "INPUT_GRAD_FACTOR", "DEFAULT_SUSTAINED_TFLOPS", "FINETUNE_EPOCHS",
           "PAPER_DATASETS", "Net", "Term", "DataSizes", "forward_flops", "count_flops", "data_sizes",
           "classifier_terms", "pseudo_label_terms", "cdm_prior_terms", "gan_prior_terms", "finetune_terms",
           "attack_terms", "evaluate_terms", "instance_terms", "estimate_plan", "estimate_grid",
           "load_grid_for_estimate", "measure_sustained_flops", "paper_calibration_models"]

# ================================================================================================
# Assumptions (every number that drives an estimate and is not read from a config)
# ================================================================================================

BACKWARD_FACTOR = 2.0
"""Backward FLOPs of a training step / forward FLOPs: each conv/linear layer computes the input
gradient and the weight gradient, each a matmul of the forward's size (the standard 2x rule; checked
with FlopCounterMode in tests/test_cost.py)."""

INPUT_GRAD_FACTOR = 1.0
"""Backward FLOPs / forward FLOPs through a FROZEN network to its input (attack latents, pixels, the
fine-tuning chain): only the input gradients are computed, autograd skips the weight gradients
(checked with FlopCounterMode in tests/test_cost.py; the first layer's input gradient makes it
slightly below 1 for a conv stack, a handful of trainable layers slightly above)."""

DEFAULT_SUSTAINED_TFLOPS = 40.0
"""Assumed sustained training throughput of ONE A100/H100-class GPU on these nets, in TFLOP/s of the
counted FLOPs above. Peaks (dense): A100 FP32 19.5, TF32 tensor cores 156; H100-SXM FP32 67, TF32 495.
PyTorch's defaults run convolutions in TF32 (cudnn.allow_tf32) and matmuls in FP32; 64 px conv nets
at the small batches used here (fine-tuning: 4 x 2 CFG images, attacks: 16-64) reach roughly a quarter
of the TF32 peak on an A100, and the count leaves out the memory-bound GroupNorm/SiLU/element-wise
work. 40 TFLOP/s is ~26 % of A100 TF32 peak and ~8 % of H100's: conservative (more hours) for an
H100, about right for an A100. An assumption, not a measurement: ``--measure`` replaces it."""

FINETUNE_EPOCHS = "max_epochs"
"""Epochs the Diff-MI fine-tuning is assumed to run: the config's ``max_epochs`` (paper: 100). It stops
earlier once T's epoch accuracy on samples reaches ``acc_threshold`` (0.99); when that happens is not
known before running, so this is an upper bound (the paper reports no epoch counts)."""

FLOP_COUNT_BATCH = 1
"""Batch size of the counting forward pass (networks in eval mode, so BatchNorm takes batch 1)."""


@dataclass(frozen=True)
class PaperDataset:
    """Size of a folder dataset as the paper uses it: ``images`` (after the paper's selection) over
    ``classes`` classes (None: unlabeled); ``source`` says where the number comes from."""

    images: int
    classes: int | None
    source: str


PAPER_DATASETS: dict[tuple[str, str], PaperDataset] = {
    ("celeba", "private"): PaperDataset(30_027, 1000, "PROTOCOL.md §1: 1000 identities, 30,027 images (KED-MI split)"),
    ("celeba", "public"): PaperDataset(30_000, None, "PROTOCOL.md §1: D_pub = 30,000 images of other identities"),
    ("ffhq", "public"): PaperDataset(70_000, None, "PROTOCOL.md §1: FFHQ (70k)"),
    ("facescrub", "public"): PaperDataset(91_712, 526, "PROTOCOL.md §1: FaceScrub cleaned, 91,712 images, 526 people"),
    ("cub200", "private"): PaperDataset(2_889, 50, "PROTOCOL.md §1: CUB classes 1-50, 2,889 images"),
    ("cub200", "public"): PaperDataset(8_899, 150, "CUB-200-2011's 11,788 images minus the 2,889 private ones"),
    ("chestxray", "private"): PaperDataset(25_344, 14, "PROTOCOL.md §1: up to 2,000 per class, 14 classes: 25,344"),
    ("chestxray", "public"): PaperDataset(60_361, 1, "NIH ChestX-ray14 'No Finding' images (60,361); the paper "
                                          "caps them at 20,000 with max_images"),
    ("chexpert_square", "public"): PaperDataset(12_940, None, "PROTOCOL.md §1: CheXpert 12,940 square 'view1' images"),
    ("celeba_hd", "private"): PaperDataset(30_027, 1000, "assumed = the 1000 most frequent CelebA identities of the "
                                           "64 px split (PROTOCOL.md §1 high-res setting gives no count)"),
    ("celeba_hd", "public"): PaperDataset(30_000, None, "assumed = the 64 px setting's public CelebA count"),
    ("ffhq_hd", "public"): PaperDataset(70_000, None, "FFHQ (70k) at full resolution"),
}
"""Paper-scale image counts of the folder datasets, keyed by (dataset, side). A config selecting a
different number of classes scales the count proportionally; ``max_per_class`` and ``max_images``
cap it. Private train/test: each class loses ``round(n_c * test_fraction)`` test images; here
``round(n * test_fraction)`` overall (the per-class rounding differs by at most one image per class)."""

INCEPTION_PROXY = "inception_v3_eval"
"""Network counted for pytorch-fid's Inception-v3 (FID, PRDC, Inception KNN features): torchvision's
Inception-v3 at 299 px (the registry's ``inception_v3_eval`` resizes inside), the same trunk up to
pool3 (~5.7 GMAC); the FID weights themselves are not needed to count."""

LPIPS_BACKBONES = {"lpips_alex": ("alexnet", 12), "lpips_vgg": ("vgg16", 30)}
"""Backbone counted for each LPIPS metric: torchvision's ``features[:n]`` of AlexNet / VGG16 (lpips's
slices up to relu5 / relu5_3), once per image (the suite caches per-image features), at the data's
image size upsampled to the metric's minimum side (``diffmi_ray.metrics.lpips_metric.LPIPS_NETS``)."""

LPIPS_HEAD_CHANNELS = {"alexnet": ((64, 4), (192, 8), (384, 16), (256, 16), (256, 16)),
                       "vgg16": ((64, 1), (128, 2), (256, 4), (512, 8), (512, 16))}
"""(channels, spatial stride) of the five LPIPS feature maps per backbone; a pair costs the 1x1 'lin'
convs on the squared feature differences: sum_l 2 * C_l * (size / stride_l)^2 FLOPs (approximate strides)."""

IQA_FLOPS_PER_PAIR_PIXEL = 0.0
"""The piq IQA metrics (PSNR ... MDSI) are element-wise / FFT work that FlopCounterMode does not count;
counted as 0 FLOPs (on a GPU they are a small part of evaluate; on the CPU they dominate evaluate's
wall time, so ``--validate`` shows evaluate under-predicted)."""

PRETRAINED_AE_FALLBACK = {"class": "VQModel", "block_out_channels": [128, 256, 512], "layers_per_block": 2,
                          "latent_channels": 3, "norm_num_groups": 32, "num_vq_embeddings": 8192, "vq_embed_dim": 3}
"""Architecture counted for a latent CDM whose ``latent.pretrained`` is a Hub id that cannot be read
offline and is not in the Hugging Face cache: LDM's vq-f4 first stage (ch 128, ch_mult 1,2,4, 2 res
blocks, embed_dim 3, 8192 codes), the 'vqvae' of CompVis/ldm-super-resolution-4x-openimages (Table VI's
grid) and of ldm-celebahq-256. A local folder's config.json is used when present."""

# ================================================================================================
# FLOP counting
# ================================================================================================


@dataclass(frozen=True)
class Net:
    """A network at its input geometry, hashable (the FLOP-count cache key).

    role: how it is built and called -- "classifier" ``m(x)``, "unet" ``m(x, t, y)``, "generator"
    ``m(z[, y])``, "discriminator" ``m(x[, y])`` (registry ``create(name, num_classes, **kwargs)``);
    "ae_encode" / "ae_decode" (a diffusers autoencoder, kwargs = its config); "flow" (VMI's
    per-class flow, kwargs = VMIAttackConfig fields + z_dim); "torchvision" (``name``'s
    ``features`` trunk). kwargs: canonical JSON of the constructor keywords. shape: the per-example
    input shape, (C, H, W) or (z_dim,).
    """

    role: str
    name: str
    num_classes: int
    kwargs: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, role: str, name: str, num_classes: int, kwargs: dict, shape: Iterable[int]) -> "Net":
        return cls(role, name, int(num_classes), json.dumps(kwargs, sort_keys=True, default=list),
                   tuple(int(s) for s in shape))

    @property
    def kw(self) -> dict:
        return json.loads(self.kwargs)

    def short(self) -> str:
        return f"{self.name}@{'x'.join(map(str, self.shape))}"


def _build(net: Net) -> nn.Module:
    kw = net.kw
    if net.role in ("classifier", "unet", "generator", "discriminator"):
        from diffmi_ray.models import create

        return create(net.name, net.num_classes, **kw)
    if net.role in ("ae_encode", "ae_decode"):
        import diffusers

        kw = dict(kw)
        cls = getattr(diffusers, kw.pop("class", "AutoencoderKL"))
        return cls.from_config(kw)
    if net.role == "flow":
        from diffmi_ray.attacks.vmi import build_flow
        from diffmi_ray.config.methods import VMIAttackConfig

        kw = dict(kw)
        z_dim = kw.pop("z_dim")
        return build_flow(z_dim, VMIAttackConfig(**kw), 0, 0)
    if net.role == "torchvision":
        import torchvision

        return getattr(torchvision.models, net.name)(weights=None).features[:net.kw.get("layers")]
    raise ValueError(f"unknown network role {net.role!r}")


def _needs_label(fn: Callable) -> bool:
    p = inspect.signature(fn).parameters.get("y")
    return p is not None and p.default is inspect.Parameter.empty


def _forward(net: Net, m: nn.Module, dev: torch.device, batch: int = FLOP_COUNT_BATCH):
    x = torch.randn(batch, *net.shape, device=dev)
    y = torch.zeros(batch, dtype=torch.long, device=dev)
    if net.role == "unet":
        return m(x, torch.zeros(batch, dtype=torch.long, device=dev), y)
    if net.role == "generator":
        return m(x, y) if getattr(m, "conditional", False) else m(x)
    if net.role == "discriminator":
        return m(x, y) if _needs_label(m.forward) else m(x)
    if net.role == "ae_encode":
        return m.encode(x)
    if net.role == "ae_decode":
        return m.decode(x)
    return m(x)


def count_flops(build: Callable[[], nn.Module], run: Callable[[nn.Module, torch.device], object],
                *, train: bool = False) -> int:
    """FLOPs (FlopCounterMode) of ``run(model, device)`` on the model from ``build()``.

    Built and run on the ``meta`` device first (shapes only, no compute, no memory); if that fails
    (an op without a meta kernel, a constructor doing numerics), again on real CPU tensors. The model
    is in eval mode unless ``train``; ``run`` decides about gradients.
    """
    err = None
    for dev in (torch.device("meta"), torch.device("cpu")):
        try:
            with torch.device(dev):
                m = build()
            m = m.to(dev).train(train)
            fc = FlopCounterMode(display=False)
            with fc:
                run(m, dev)
            return int(fc.get_total_flops())
        except Exception as e:  # noqa: BLE001 - any failure on meta means: try real tensors
            err = e
    raise RuntimeError(f"cannot count FLOPs: {err}") from err


@functools.lru_cache(maxsize=None)
def forward_flops(net: Net) -> float:
    """Forward FLOPs of ONE example (counted at batch :data:`FLOP_COUNT_BATCH`, divided by it)."""

    def run(m, dev):
        with torch.no_grad():
            _forward(net, m, dev)

    return count_flops(lambda: _build(net), run) / FLOP_COUNT_BATCH


@functools.lru_cache(maxsize=None)
def gradient_penalty_flops(net: Net, batch: int = 2) -> float:
    """FLOPs per example of WGAN-GP's penalty term (:func:`diffmi_ray.training.gan_wgangp.gradient_penalty`
    + its share of the critic's backward): D(x'), the input gradient with create_graph, and the
    backward of the penalty through that double graph into D's weights. Counted, not assumed."""

    def run(m, dev):
        x = torch.randn(batch, *net.shape, device=dev, requires_grad=True)
        # .backward(inputs=...) rather than autograd.grad: FlopCounterMode's module hooks reject the latter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # create_graph=True reference-cycle notice
            m(x).sum().backward(inputs=[x], create_graph=True)
        ((x.grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean().backward(inputs=list(m.parameters()))

    return count_flops(lambda: _build(net), run, train=True) / batch


@functools.lru_cache(maxsize=None)
def bido_flops(net: Net, batch: int, measure: str, sigma: float) -> float:
    """FLOPs of BiDO's dependence terms (kernel matrices, HSIC/COCO) on one training batch of ``batch``
    images of classifier ``net`` (forward only; the step multiplies by 1 + BACKWARD_FACTOR). 0 when
    it cannot be counted (the term is small next to the network)."""
    from diffmi_ray.defenses.bido import bido_terms

    state: dict = {}

    def run(m, dev):
        with torch.no_grad():
            x = torch.rand(batch, *net.shape, device=dev)
            hidden, _ = m.forward_with_hidden(x)
        state["args"] = (x, hidden)

    def kernels(m, dev):
        x, hidden = state["args"]
        y = torch.zeros(batch, net.num_classes, device=dev)
        bido_terms(x, hidden, y, measure=measure, sigma=sigma)

    try:
        total = count_flops(lambda: _build(net), lambda m, dev: (run(m, dev), kernels(m, dev)))
        net_only = count_flops(lambda: _build(net), run)
        return float(total - net_only)
    except Exception:  # noqa: BLE001
        return 0.0


# ================================================================================================
# dataset sizes
# ================================================================================================


@dataclass(frozen=True)
class DataSizes:
    """Image counts of one split: private ``classes``, ``train`` / ``test`` images, ``public`` images;
    ``source``: "split" (computed from the packaged data) or "paper table"."""

    classes: int
    train: int
    test: int
    public: int
    source: str

    @property
    def train_per_class(self) -> float:
        return self.train / max(self.classes, 1)


def _paper_count(side, role: str) -> tuple[int, int | None]:
    key = (side.dataset, role)
    if key not in PAPER_DATASETS:
        raise KeyError(f"no paper-scale image count for the {role} side of dataset {side.dataset!r}; add it to "
                       f"diffmi_ray.cost.PAPER_DATASETS (known: {sorted(PAPER_DATASETS)})")
    ref = PAPER_DATASETS[key]
    n, classes = ref.images, ref.classes
    if side.classes is not None and ref.classes:
        n = round(n * len(side.classes) / ref.classes)
        classes = len(side.classes)
    if side.max_per_class is not None and classes:
        n = min(n, side.max_per_class * classes)
    if side.max_images is not None:
        n = min(n, side.max_images)
    return int(n), classes


@functools.lru_cache(maxsize=None)
def _data_sizes(data_json: str, seed: int) -> DataSizes:
    from diffmi_ray.config.data import DataConfig
    from diffmi_ray.data import get_info

    data = DataConfig.model_validate_json(data_json)
    if not get_info(data.private.dataset).needs_root and not get_info(data.public.dataset).needs_root:
        from diffmi_ray.data.splits import make_split

        s = make_split(data, seed)
        return DataSizes(s.num_classes, len(s.private_train), len(s.private_test), len(s.public), "split")
    n_priv, c_priv = _paper_count(data.private, "private")
    n_pub, _ = _paper_count(data.public, "public")
    c_priv = c_priv or get_info(data.private.dataset).num_classes or 1
    test = int(round(n_priv * data.test_fraction))
    return DataSizes(int(c_priv), n_priv - test, test, n_pub, "paper table")


def data_sizes(data, seed: int = 0) -> DataSizes:
    """:class:`DataSizes` of a :class:`~diffmi_ray.config.data.DataConfig` (or its JSON dump dict)."""
    if not isinstance(data, dict):
        data = data.model_dump(mode="json")
    return _data_sizes(json.dumps(data, sort_keys=True), int(seed))


# ================================================================================================
# per-stage formulas
# ================================================================================================


@dataclass(frozen=True)
class Term:
    """One part of a stage's cost: ``flops`` (FLOPs) and a short description ``what``."""

    what: str
    flops: float


def _t(what: str, count: float, net: Net, factor: float = 1.0) -> Term:
    return Term(f"{what}: {count:,.0f} x {net.short()} x{factor:g}", float(count) * forward_flops(net) * factor)


TRAIN = 1.0 + BACKWARD_FACTOR
"""Pass factor of a training step (forward + full backward)."""
THROUGH = 1.0 + INPUT_GRAD_FACTOR
"""Pass factor of forward + input-gradient backward through a frozen network."""


def classifier_net(cfg, image_size: int, channels: int, num_classes: int) -> Net:
    """The classifier of a ``ClassifierConfig`` (dump or model) at the data geometry."""
    from diffmi_ray.config.classifier import ClassifierConfig
    from diffmi_ray.pipeline.stages.train_classifier import model_kwargs

    cfg = ClassifierConfig.model_validate(cfg)
    return Net.of("classifier", cfg.model, num_classes, model_kwargs(cfg, image_size, channels),
                  (channels, image_size, image_size))


def classifier_terms(cfg, image_size: int, channels: int, sizes: DataSizes) -> list[Term]:
    """``train_classifier``: ``epochs x train`` training examples, T on the test split after every epoch
    and on the train split once at the end; BiDO's kernels per batch when enabled. A community
    checkpoint costs only the two accuracy passes."""
    from diffmi_ray.config.classifier import ClassifierConfig

    cfg = ClassifierConfig.model_validate(cfg)
    net = classifier_net(cfg, image_size, channels, sizes.classes)
    if cfg.checkpoint:
        return [_t("accuracy", sizes.train + sizes.test, net)]
    tc = cfg.train
    terms = [_t("train", tc.epochs * sizes.train, net, TRAIN),
             _t("test acc", tc.epochs * sizes.test, net),
             _t("train acc", sizes.train, net)]
    if tc.bido.enabled:
        b = min(tc.batch_size, max(sizes.train, 1))
        steps = tc.epochs * math.ceil(sizes.train / b)
        terms.append(Term(f"BiDO kernels: {steps:,} batches of {b}",
                          steps * bido_flops(net, b, tc.bido.measure, tc.bido.sigma) * TRAIN))
    return terms


def pseudo_label_terms(target: Net, sizes: DataSizes) -> list[Term]:
    """``pseudo_labels``: T's forward (logits + features in one pass) over every public image."""
    return [_t("score public", sizes.public, target)]


def _codec_nets(latent, data_size: int, channels: int) -> tuple[Net, Net, tuple[int, int, int]] | None:
    """(encoder, decoder, latent shape (c, s, s)) of a latent CDM's first stage, or None (pixel space)."""
    if latent is None:
        return None
    from diffmi_ray.config.methods import LatentConfig

    from diffmi_ray.models.autoencoder import arch_config, downsample_factor, local_pretrained_config

    lat = LatentConfig.model_validate(latent)
    size = lat.image_size or data_size
    if lat.pretrained is None:
        cfg = {"class": "AutoencoderKL", **arch_config(lat, channels, size)}
    else:
        raw = local_pretrained_config(lat)
        if raw is None:  # a Hub id: its config.json if the Hugging Face cache holds it (no download)
            try:
                from huggingface_hub import try_to_load_from_cache

                hit = try_to_load_from_cache(lat.pretrained, "config.json", subfolder=lat.subfolder)
                raw = json.loads(Path(hit).read_text()) if isinstance(hit, str) else None
            except Exception:  # noqa: BLE001 - no huggingface_hub or a malformed id: use the fallback
                pass
        if raw is not None:
            cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
            cfg["class"] = raw.get("_class_name", "AutoencoderKL")
        else:
            fb = PRETRAINED_AE_FALLBACK
            levels = len(fb["block_out_channels"])
            cfg = {**fb, "in_channels": channels, "out_channels": channels, "sample_size": size,
                   "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    f = downsample_factor(cfg["block_out_channels"])
    lshape = (int(cfg["latent_channels"]), size // f, size // f)
    enc = Net.of("ae_encode", cfg["class"], 0, cfg, (channels, size, size))
    dec = Net.of("ae_decode", cfg["class"], 0, cfg, lshape)
    return enc, dec, lshape


def cdm_unet_net(prior, image_size: int, channels: int, num_classes: int) -> Net:
    """The CDM U-Net of a ``CDMPriorConfig`` (dump or model) at its working geometry (latent or pixels)."""
    from diffmi_ray.config.methods import CDMPriorConfig
    from diffmi_ray.training.cdm import PAPER_MODEL, unet_kwargs

    prior = CDMPriorConfig.model_validate(prior)
    codec = _codec_nets(prior.latent, image_size, channels)
    c, s = (codec[2][0], codec[2][1]) if codec else (channels, image_size)
    if prior.checkpoint:
        return Net.of("unet", PAPER_MODEL, num_classes, {"dropout": prior.unet.dropout}, (3, 64, 64))
    return Net.of("unet", prior.unet.model, num_classes, unet_kwargs(prior.unet, s, c), (c, s, s))


def cdm_prior_terms(prior, image_size: int, channels: int, num_classes: int, n_images: int) -> list[Term]:
    """``train_prior`` kind cdm: ``iterations x batch_size`` U-Net training examples (EMA and AdamW updates
    not counted). Latent mode adds the autoencoder's training (``latent.iterations x batch_size``
    encode + decode steps, when not pretrained) and encoding the ``n_images`` training images (twice with
    h-flip). A released checkpoint costs 0."""
    from diffmi_ray.config.methods import CDMPriorConfig

    prior = CDMPriorConfig.model_validate(prior)
    if prior.checkpoint:
        return [Term("released checkpoint", 0.0)]
    unet = cdm_unet_net(prior, image_size, channels, num_classes)
    terms = [_t("U-Net steps", prior.iterations * prior.batch_size, unet, TRAIN)]
    codec = _codec_nets(prior.latent, image_size, channels)
    if codec:
        enc, dec, _ = codec
        if prior.latent.pretrained is None:
            n = prior.latent.iterations * prior.latent.batch_size
            terms += [_t("AE train enc", n, enc, TRAIN), _t("AE train dec", n, dec, TRAIN)]
        terms.append(_t("encode", n_images * (2 if prior.hflip else 1), enc))
    return terms


def gan_nets(kind: str, prior, image_size: int, channels: int, num_classes: int) -> tuple[Net, Net]:
    """(G, D) of a GAN prior config at its geometry: ``arch.image_size`` when set (the GAN's own size;
    resizing to the data's size is not counted), else the data's (the constructors of training/gan_wgangp)."""
    from diffmi_ray.config.methods import GMIPriorConfig, KEDMIPriorConfig, PLGMIPriorConfig
    from diffmi_ray.training.gan_wgangp import model_kwargs

    cls = {"gan_wgangp": GMIPriorConfig, "gan_kedmi": KEDMIPriorConfig, "gan_plgmi": PLGMIPriorConfig}[kind]
    arch = cls.model_validate(prior).arch
    n = 0 if kind == "gan_wgangp" else num_classes
    image_size = int(getattr(arch, "image_size", None) or image_size)  # a GAN trained at its own size
    gkw = model_kwargs(arch.generator, num_classes=n, image_size=image_size, channels=channels, width=arch.width,
                       z_dim=arch.z_dim)
    dkw = model_kwargs(arch.discriminator, num_classes=n, image_size=image_size, channels=channels, width=arch.width)
    G = Net.of("generator", arch.generator, n, gkw, (arch.z_dim,))
    D = Net.of("discriminator", arch.discriminator, n, dkw, (channels, image_size, image_size))
    return G, D


def gan_prior_terms(kind: str, prior, image_size: int, channels: int, num_classes: int, n_images: int,
                    target: Net | None = None) -> list[Term]:
    """``train_prior`` GAN kinds, per generator iteration (b = batch_size, n_critic critic steps):

    * gan_wgangp (GMI): n_critic x [G(z) forward, D train on real and fake, gradient penalty
      (counted, :func:`gradient_penalty_flops`)] + G step (G train, D forward + input grad);
    * gan_kedmi: n_critic x [G, T forwards, D train on labelled, unlabelled and fake batches] + G step
      (D forward on a real batch, G train, D through);
    * gan_plgmi: G step (G train, D through, T through on the augmented fakes) + n_critic x [G forward,
      D train on real and fake].

    Iterations: ``train.iterations`` or ``epochs x (n_images // b) // n_critic``
    (:func:`diffmi_ray.training.gan_wgangp.total_iterations`). Community checkpoints cost 0.
    """
    from diffmi_ray.config.methods import GMIPriorConfig, KEDMIPriorConfig, PLGMIPriorConfig
    from diffmi_ray.training.gan_wgangp import total_iterations

    cls = {"gan_wgangp": GMIPriorConfig, "gan_kedmi": KEDMIPriorConfig, "gan_plgmi": PLGMIPriorConfig}[kind]
    cfg = cls.model_validate(prior)
    tc = cfg.train
    if tc.generator_checkpoint:
        return [Term("community checkpoint", 0.0)]
    G, D = gan_nets(kind, cfg, image_size, channels, num_classes)
    it = total_iterations(tc, max(n_images, 1))
    b, nc = tc.batch_size, tc.n_critic
    if kind == "gan_wgangp":
        return [_t("D steps: G fwd", it * nc * b, G), _t("D steps: D real+fake", it * nc * 2 * b, D, TRAIN),
                Term(f"D steps: gradient penalty {it * nc * b:,} x", it * nc * b * gradient_penalty_flops(D)),
                _t("G step: G", it * b, G, TRAIN), _t("G step: D", it * b, D, THROUGH)]
    if kind == "gan_kedmi":
        return [_t("D steps: G fwd", it * nc * b, G), _t("D steps: T fwd", it * nc * b, target),
                _t("D steps: D lab+unlab+fake", it * nc * 3 * b, D, TRAIN),
                _t("G step: D real", it * b, D), _t("G step: G", it * b, G, TRAIN), _t("G step: D", it * b, D, THROUGH)]
    return [_t("G step: G", it * b, G, TRAIN), _t("G step: D", it * b, D, THROUGH),
            _t("G step: T on aug", it * b, target, THROUGH),
            _t("D steps: G fwd", it * nc * b, G), _t("D steps: D real+fake", it * nc * 2 * b, D, TRAIN)]


def cfg_passes(w: float) -> int:
    """U-Net passes per classifier-free-guided evaluation: 1 for w in {0, 1}, else 2 (cond + null)."""
    return 1 if float(w) in (0.0, 1.0) else 2


def finetune_terms(ft, unet: Net, target: Net, codec: tuple[Net, Net, tuple] | None = None) -> list[Term]:
    """``finetune_cdm``: steps = probe_steps (when ``layers`` is an int) + epochs x ceil(classes / batch)
    (epochs = :data:`FINETUNE_EPOCHS`). Per step of b samples with S = sampler_steps and P CFG passes:

    * sampler forward: S x P x b U-Net examples; backward through the chain: the same x INPUT_GRAD_FACTOR
      (the U-Net is frozen but for the label embedding and a few middle-block layers);
      ``grad_checkpointing`` recomputes every evaluation once more (+1 forward);
    * T on aug_copies x K x b images (K = the 8 official loss targets), forward + input gradient;
    * latent CDMs: the decoder on K x b latents, forward + input gradient (+1 forward with checkpointing).
    """
    from diffmi_ray.config.methods import FinetuneConfig
    from diffmi_ray.training.finetune import loss_target_indices

    ft = dict(ft)
    classes = ft.pop("classes", None)
    cfg = FinetuneConfig.model_validate({**ft, "classes": classes})
    C = int(cfg.classes or unet.num_classes)
    epochs = cfg.max_epochs if FINETUNE_EPOCHS == "max_epochs" else int(FINETUNE_EPOCHS)
    steps = epochs * math.ceil(C / cfg.batch_size) + (cfg.probe_steps if isinstance(cfg.layers, int) else 0)
    b, S, P = cfg.batch_size, cfg.sampler_steps, cfg_passes(cfg.guidance)
    K = len(loss_target_indices(S, cfg.official_intermediates)) + 1
    evals = steps * S * P * b
    fwd_factor = 1.0 + INPUT_GRAD_FACTOR + (1.0 if cfg.grad_checkpointing else 0.0)
    terms = [_t(f"sampler ({steps:,} steps)", evals, unet, fwd_factor),
             _t("T on aug targets", steps * cfg.aug_copies * K * b, target, THROUGH)]
    if codec:
        terms.append(_t("decode targets", steps * K * b, codec[1], fwd_factor))
    return terms


def _attack_cfg(method: str, attack: dict):
    from diffmi_ray.config.methods import METHOD_CONFIGS

    return METHOD_CONFIGS[method].model_fields["attack"].annotation.model_validate(attack)


def attack_terms(method: str, attack: dict, classes: int, images_per_class: int, target: Net, *,
                 unet: Net | None = None, codec=None, G: Net | None = None, D: Net | None = None) -> list[Term]:
    """``attack``: N = classes x images_per_class reconstructions (+ T on all N at the end of the stage).

    * diff_mi, per image: iterations x [P U-Net passes through (prior step) + T through on aug_copies
      copies (attack step) (+ decoder through, latent)] + ddim_steps x P U-Net forwards (when renoise_t
      > 0) + PGD: (iterations + 1) T forwards and iterations input gradients + T forward (score);
    * gmi, per image and restart: iterations x (G + D + T) through; final G + T forward;
    * kedmi, per class and restart: iterations x batch_size x (G + D + T) through (+ restart selection);
      final N x (G + T);
    * plgmi, per image and restart: iterations x (G + aug_views x T) through; final G + T;
    * vmi, per class: steps x batch_size x [(G + T) through + 2 flow passes trained]; final N x (flow + G + T);
    * ppa: candidates x (G + 2 T) once; per class keep x [iterations x (G + T) through + G +
      final_transforms x T]; final N x T.
    """
    cfg = _attack_cfg(method, attack)
    N, C = classes * images_per_class, classes
    end = [_t("stage: T on results", N, target)]
    if method == "diff_mi":
        P = cfg_passes(cfg.guidance)
        terms = [_t("IIR prior step", N * cfg.iterations * P, unet, THROUGH),
                 _t("IIR attack step: T", N * cfg.iterations * cfg.aug_copies, target, THROUGH)]
        if codec:
            terms += [_t("IIR decode", N * cfg.iterations, codec[1], THROUGH), _t("final decode", N, codec[1])]
        if cfg.renoise_t > 0:
            terms.append(_t("DDIM", N * cfg.ddim_steps * P, unet))
        if cfg.pgd.enabled:
            terms += [_t("PGD fwd", N * (cfg.pgd.iterations + 1), target),
                      _t("PGD grad", N * cfg.pgd.iterations, target, INPUT_GRAD_FACTOR)]
        return terms + [_t("score", N, target)] + end
    if method == "gmi":
        n = N * cfg.restarts * cfg.iterations
        return [_t("G", n, G, THROUGH), _t("D", n, D, THROUGH), _t("T", n, target, THROUGH),
                _t("final G", N * cfg.restarts, G), _t("final T", N * cfg.restarts, target)] + end
    if method == "kedmi":
        n = C * cfg.restarts * cfg.iterations * cfg.batch_size
        terms = [_t("G", n, G, THROUGH), _t("D", n, D, THROUGH), _t("T", n, target, THROUGH)]
        if cfg.restarts > 1:
            m = C * cfg.restarts * cfg.batch_size
            terms += [_t("restart pick G", m, G), _t("restart pick T", m, target)]
        return terms + [_t("final G", N, G), _t("final T", N, target)] + end
    if method == "plgmi":
        n = N * cfg.restarts * cfg.iterations
        return [_t("G", n, G, THROUGH), _t("T on views", n * cfg.aug_views, target, THROUGH),
                _t("final G", N * cfg.restarts, G), _t("final T", N * cfg.restarts, target)] + end
    if method == "vmi":
        flow = Net.of("flow", "glow_vector_flow", 0,
                      {"z_dim": G.shape[0], "flow_steps": cfg.flow_steps, "flow_levels": cfg.flow_levels},
                      (G.shape[0],))
        n = C * cfg.steps * cfg.batch_size
        return [_t("G", n, G, THROUGH), _t("T", n, target, THROUGH), _t("flows (CE + KL batches)", 2 * n, flow, TRAIN),
                _t("final flow", N, flow), _t("final G", N, G), _t("final T", N, target)] + end
    if method == "ppa":
        k = C * cfg.keep
        return [_t("pool G", cfg.candidates, G), _t("pool T (+ flip)", 2 * cfg.candidates, target),
                _t("opt G", k * cfg.iterations, G, THROUGH), _t("opt T", k * cfg.iterations, target, THROUGH),
                _t("final G", k, G), _t("final transforms T", k * cfg.final_transforms, target),
                _t("final T", N, target)] + end
    raise ValueError(f"unknown attack method {method!r}")


def evaluate_terms(evaluation: dict, classes: int, images_per_class: int, refs_per_class: float,
                   eval_net: Net) -> list[Term]:
    """``evaluate``: N = classes x images_per_class reconstructions and R = classes x refs_per_class private
    references. E forward on N + R (features once per image); Inception (:data:`INCEPTION_PROXY`) on
    N + R when FID / PRDC / Inception-KNN are on; LPIPS backbones on N + R plus their heads per
    (reconstruction, same-class reference) pair; piq IQA metrics: :data:`IQA_FLOPS_PER_PAIR_PIXEL`."""
    from diffmi_ray.config.evaluation import EvaluationConfig
    from diffmi_ray.pipeline.stages.train_classifier import model_kwargs
    from diffmi_ray.config.classifier import ClassifierConfig

    cfg = EvaluationConfig.model_validate(evaluation)
    ch, size = eval_net.shape[0], eval_net.shape[-1]
    N, R = classes * images_per_class, classes * refs_per_class
    pairs = N * refs_per_class
    terms = [_t("E on recon + refs", N + R, eval_net)]
    m = set(cfg.metrics)
    if "fid" in m or ("prdc" in m and cfg.prdc_features == "inception") or \
            ("knn" in m and cfg.knn_features == "inception"):
        inc = Net.of("classifier", INCEPTION_PROXY, 1000,
                     model_kwargs(ClassifierConfig(model=INCEPTION_PROXY), size, 3), (3, size, size))
        terms.append(_t("Inception on recon + refs", N + R, inc))
    from diffmi_ray.metrics.lpips_metric import LPIPS_NETS

    for metric, (backbone, layers) in LPIPS_BACKBONES.items():
        if metric in m:
            side = max(size, LPIPS_NETS[metric][1])
            net = Net.of("torchvision", backbone, 0, {"layers": layers}, (3, side, side))
            head = sum(2 * c * (side / s) ** 2 for c, s in LPIPS_HEAD_CHANNELS[backbone])
            terms += [_t(f"{metric} backbone", N + R, net), Term(f"{metric} heads: {pairs:,.0f} pairs", pairs * head)]
    iqa = [x for x in m if x not in {"acc", "knn", "fid", "fid_evalnet", "prdc", *LPIPS_BACKBONES}]
    if iqa:
        terms.append(Term(f"IQA {len(iqa)} metrics: {pairs:,.0f} pairs (not counted)",
                          len(iqa) * pairs * size * size * IQA_FLOPS_PER_PAIR_PIXEL))
    return terms


# ================================================================================================
# a planned grid
# ================================================================================================


def _parent(plan, inst, role: str):
    return plan.instances[inst.parents[role]]


def _split_of(plan, inst):
    while "split" not in inst.parents:
        inst = _parent(plan, inst, next(iter(inst.parents)))
    return _parent(plan, inst, "split")


def _sizes(plan, inst) -> DataSizes:
    split = inst if inst.stage == "split" else _split_of(plan, inst)
    return data_sizes(split.config["data"], split.config["seed"])


def _classifier_of(plan, inst) -> Net:
    c = inst.config
    return classifier_net(c["classifier"], c["image_size"], c["channels"], _sizes(plan, inst).classes)


def _prior_of(plan, inst):
    """The train_prior instance behind an attack's generator (through finetune_cdm)."""
    g = _parent(plan, inst, "generator") if "generator" in inst.parents else inst
    return _parent(plan, g, "prior") if g.stage == "finetune_cdm" else g


def _cdm_parts(plan, prior_inst):
    c = prior_inst.config
    C = _sizes(plan, prior_inst).classes
    unet = cdm_unet_net(c["prior"], c["image_size"], c["channels"], C)
    from diffmi_ray.config.methods import CDMPriorConfig

    latent = CDMPriorConfig.model_validate(c["prior"]).latent
    return unet, _codec_nets(latent, c["image_size"], c["channels"])


def instance_terms(plan, inst) -> list[Term]:
    """The cost terms of one unique stage instance of ``plan``."""
    c, stage = inst.config, inst.stage
    if stage == "split":
        return [Term("index lists only", 0.0)]
    sizes = _sizes(plan, inst)
    if stage == "train_classifier":
        return classifier_terms(c["classifier"], c["image_size"], c["channels"], sizes)
    if stage == "pseudo_labels":
        return pseudo_label_terms(_classifier_of(plan, _parent(plan, inst, "target")), sizes)
    if stage == "train_prior":
        kind = c["kind"]
        if kind == "cdm":
            pl = _parent(plan, inst, "pseudo_labels").config["pseudo_labels"]
            from diffmi_ray.config.methods import CDMPriorConfig

            n = sizes.public if CDMPriorConfig.model_validate(c["prior"]).use_all_public else \
                sizes.classes * min(pl["top_n"], sizes.public)
            return cdm_prior_terms(c["prior"], c["image_size"], c["channels"], sizes.classes, n)
        target = _classifier_of(plan, _parent(plan, inst, "target")) if "target" in inst.parents else None
        n = sizes.public
        if kind == "gan_plgmi":
            n = sizes.classes * min(_parent(plan, inst, "pseudo_labels").config["pseudo_labels"]["top_n"], sizes.public)
        return gan_prior_terms(kind, c["prior"], c["image_size"], c["channels"], sizes.classes, n, target)
    if stage == "finetune_cdm":
        unet, codec = _cdm_parts(plan, _parent(plan, inst, "prior"))
        return finetune_terms(c["finetune"], unet, _classifier_of(plan, _parent(plan, inst, "target")), codec)
    if stage == "attack":
        target = _classifier_of(plan, _parent(plan, inst, "target"))
        prior = _prior_of(plan, inst)
        kw: dict = {}
        if prior.config["kind"] == "cdm":
            kw["unet"], kw["codec"] = _cdm_parts(plan, prior)
        else:
            pc = prior.config
            kw["G"], kw["D"] = gan_nets(pc["kind"], pc["prior"], pc["image_size"], pc["channels"], sizes.classes)
        return attack_terms(c["method"], c["attack"], c["classes"], c["images_per_class"], target, **kw)
    if stage == "evaluate":
        refs = sizes.train_per_class
        if c.get("reference_images_per_class"):
            refs = min(refs, c["reference_images_per_class"])
        return evaluate_terms(c["evaluation"], c["classes"], c["images_per_class"], refs,
                              _classifier_of(plan, _parent(plan, inst, "eval")))
    raise ValueError(f"unknown stage {stage!r}")


def estimate_plan(plan, sustained_flops: float):
    """(per-instance DataFrame, per-stage DataFrame, total GPU-hours) of a planned grid.

    Per instance: stage, label, key, flops, gpu_hours (= flops / sustained_flops / 3600), detail (the
    three largest terms). Per stage type (all of STAGES, in order): instances, flops, gpu_hours.
    """
    import pandas as pd

    rows = []
    for inst in plan.instances.values():
        terms = instance_terms(plan, inst)
        flops = float(sum(t.flops for t in terms))
        top = sorted(terms, key=lambda t: -t.flops)[:3]
        rows.append({"stage": inst.stage, "label": inst.label, "key": inst.key, "flops": flops,
                     "gpu_hours": flops / sustained_flops / 3600.0,
                     "detail": "; ".join(f"{t.what} = {t.flops:.3g}" for t in top)})
    df = pd.DataFrame(rows, columns=["stage", "label", "key", "flops", "gpu_hours", "detail"])
    order = {s: i for i, s in enumerate(STAGES)}
    df = df.sort_values(["stage", "label"], key=lambda s: s.map(order) if s.name == "stage" else s,
                        ignore_index=True)
    per = (df.groupby("stage").agg(instances=("key", "size"), flops=("flops", "sum"), gpu_hours=("gpu_hours", "sum"))
           .reindex(list(STAGES), fill_value=0))
    per["instances"] = per["instances"].astype(int)
    per = per.reset_index()
    return df, per, float(df["gpu_hours"].sum())


def load_grid_for_estimate(path):
    """``load_grid(path)``; when the only problems are missing dataset folders / split files (paper
    grids on a machine without the data), loads again without the semantic checks."""
    from diffmi_ray.config.loader import load_grid
    from diffmi_ray.errors import ConfigError

    try:
        return load_grid(path)
    except ConfigError as e:
        if all("not found" in msg for _, msg in e.problems):
            return load_grid(path, check_semantics=False)
        raise


def estimate_grid(path, sustained_tflops: float = DEFAULT_SUSTAINED_TFLOPS):
    """Plan the grid file ``path`` and estimate it at ``sustained_tflops`` TFLOP/s:
    ``(per_instance_df, per_stage_df, total_gpu_hours)`` (see :func:`estimate_plan`)."""
    from diffmi_ray.pipeline.plan import plan_grid

    return estimate_plan(plan_grid(load_grid_for_estimate(path)), float(sustained_tflops) * 1e12)


# ================================================================================================
# calibration on a real device
# ================================================================================================


def paper_calibration_models(device: torch.device) -> list[tuple[str, Net, int]]:
    """(label, network, batch) timed by :func:`measure_sustained_flops` by default: the paper CDM U-Net
    (UNetConfig defaults, 64 px RGB, 1000 + 1 classes; batch 8 on a GPU, 1 on the CPU) and the paper
    VGG16 target (64 px, 1000 classes; batch 64 / 8)."""
    from diffmi_ray.config.methods import UNetConfig
    from diffmi_ray.training.cdm import unet_kwargs

    gpu = device.type != "cpu"
    unet = Net.of("unet", "cdm_unet", 1000, unet_kwargs(UNetConfig(), 64, 3), (3, 64, 64))
    vgg = classifier_net({"model": "vgg16"}, 64, 3, 1000)
    return [("cdm_unet 64px", unet, 8 if gpu else 1), ("vgg16 64px", vgg, 64 if gpu else 8)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_sustained_flops(device=None, *, models: list[tuple[str, Net, int]] | None = None, steps: int = 3,
                            warmup: int = 1, threads: int | None = None) -> dict:
    """Time real training steps (forward, backward, AdamW step) on ``device`` and return achieved FLOP/s.

    ``models``: (label, network, batch) triples, default :func:`paper_calibration_models`. Each is
    built on the device, run ``warmup`` untimed steps, then ``steps`` timed ones; its FLOPs per step
    are ``batch x forward_flops x (1 + BACKWARD_FACTOR)``, the estimator's own units. ``threads`` sets
    torch's intra-op threads for the measurement (restored afterwards). Returns ``{"device",
    "threads", "flops_per_s"` (all models' FLOPs / all their time), "models": {label: {"batch",
    "flops_per_step", "seconds_per_step", "flops_per_s"}}}``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = models or paper_calibration_models(device)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    out: dict = {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                 "threads": torch.get_num_threads(), "models": {}}
    total_flops = total_s = 0.0
    try:
        for label, net, batch in models:
            torch.manual_seed(0)
            m = _build(net).to(device).train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-6)

            def step():
                out_ = _forward(net, m, device, batch)
                if isinstance(out_, (tuple, list)):
                    out_ = out_[-1]
                loss = out_.float().pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(warmup):
                step()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            sec = (time.perf_counter() - t0) / steps
            fl = batch * forward_flops(net) * TRAIN
            out["models"][label] = {"batch": batch, "flops_per_step": fl, "seconds_per_step": sec,
                                    "flops_per_s": fl / sec}
            total_flops += fl * steps
            total_s += sec * steps
            del m, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(old_threads)
    out["flops_per_s"] = total_flops / total_s if total_s else float("nan")
    return out
