"""Per-method configuration: each method's prior, optional fine-tuning and attack, with the official
defaults of PROTOCOL.md §3-4 (paper scale). CPU-scale grids override sizes and step counts.

Each method config declares which shared stages its grid points need (class variables read by the
planner): ``prior_kind`` (the ``train_prior`` kind), ``uses_pseudo_labels`` and ``uses_target_in_prior``.
A prior of the same kind with the same config is shared between methods (e.g. the public-data GAN of
GMI, VMI and PPA at CPU scale), because its stage key depends only on the prior's fields.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from diffmi_ray.config.base import StrictModel

# --------------------------------------------------------------------------------------------- shared


class PseudoLabelConfig(StrictModel):
    """Top-n pseudo-labelling of the public set by the target (Diff-MI step 1a, PLG-MI)."""

    top_n: int = Field(30, ge=1, description="Public images kept per target class (n).")
    score: Literal["logit", "softmax"] = Field(
        "logit", description="Ranking score: the paper's logit (default) or the official code's softmax prob.")
    batch_size: int = Field(256, ge=1, description="Batch size for scoring the public set.")


class PGDConfig(StrictModel):
    """Targeted L2 PGD on the target classifier (Diff-MI's final step)."""

    enabled: bool = Field(True, description="Run PGD after the denoise (Table X 'PGD').")
    eps: float = Field(0.5, ge=0.0, description="L2 radius in [0,1] pixel units.")
    step_size: float = Field(0.1, gt=0.0, description="L2 step size.")
    iterations: int = Field(10, ge=1, description="PGD iterations (the best iterate is kept).")
    random_start: bool = Field(True, description="Start from a random point in the L2 ball.")


class GANArchConfig(StrictModel):
    """Architecture of a GAN prior (registry names of generator and discriminator + options)."""

    generator: str = Field("dcgan_generator", description="Generator registry name.")
    discriminator: str = Field("wgan_critic", description="Discriminator registry name.")
    z_dim: int = Field(100, ge=1, description="Latent size.")
    width: int = Field(64, ge=1, description="Base channel width of generator and discriminator.")
    image_size: int | None = Field(
        None, ge=8, description="Public-data GAN (GMI / VMI / PPA) only: build and train the GAN at this size "
        "(public images resized to it); attacks resize its images to the target's input size (bilinear, "
        "antialiased), as PPA resizes its StyleGAN2's outputs to 224 px. None = the data's image_size.")


class GANTrainConfig(StrictModel):
    """Adversarial training recipe shared by the GAN priors."""

    epochs: int = Field(280, ge=1, description="Epochs over the public set (GMI ~280, KED-MI 120).")
    iterations: int | None = Field(None, ge=1, description="Generator iterations; overrides epochs when set.")
    batch_size: int = Field(64, ge=1, description="Global batch size.")
    lr: float = Field(2e-4, gt=0.0, description="Adam learning rate of G and D.")
    betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas.")
    n_critic: int = Field(5, ge=1, description="Discriminator steps per generator step.")
    checkpoint_every: int = Field(500, ge=1, description="Save a resumable checkpoint every N generator steps.")
    generator_checkpoint: str | None = Field(None, description="Load a community generator instead of training.")
    discriminator_checkpoint: str | None = Field(None, description="Load a community discriminator too.")


# ------------------------------------------------------------------------------------------- Diff-MI


class UNetConfig(StrictModel):
    """Class-conditional U-Net (guided-diffusion layout). Paper: 128 ch, mult 1,2,3,4, 3 blocks."""

    model: str = Field("cdm_unet", description="U-Net registry name.")
    model_channels: int = Field(128, ge=8, description="Base channel count.")
    channel_mult: list[int] = Field([1, 2, 3, 4], min_length=1, description="Channel multiplier per level.")
    num_res_blocks: int = Field(3, ge=1, description="ResBlocks per level.")
    attention_resolutions: list[int] = Field([16, 8], description="Feature-map sizes (pixels) with attention.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in ResBlocks.")


class DiffusionConfig(StrictModel):
    """Forward process: linear betas over `steps` timesteps (0-based t)."""

    steps: int = Field(1000, ge=10, description="Number of diffusion timesteps T.")
    beta_start: float = Field(1e-4, gt=0.0, description="beta_1.")
    beta_end: float = Field(0.02, gt=0.0, lt=1.0, description="beta_T.")


class AutoencoderArchConfig(StrictModel):
    """A diffusers ``AutoencoderKL`` built and trained here when ``latent.pretrained`` is None.

    Downsampling factor f = 2 ** (len(block_out_channels) - 1): (64, 128, 128) gives f = 4, LDM's
    kl-f4 geometry (256 px -> 64 x 64 latents).
    """

    block_out_channels: list[int] = Field([64, 128, 128], min_length=1, description="Channels per level.")
    layers_per_block: int = Field(1, ge=1, description="ResNet blocks per level.")
    latent_channels: int = Field(3, ge=1, description="Latent channels (LDM kl-f4: 3).")
    norm_num_groups: int = Field(32, ge=1, description="GroupNorm groups (must divide every width).")


class LatentConfig(StrictModel):
    """Latent diffusion (paper Table VI, LDM): the CDM works on an autoencoder's scaled latents.

    Images (resized to ``image_size``) are encoded once to latents z; the CDM trains, fine-tunes and
    attacks on ``z * scaling_factor``; the decoder (frozen, differentiable) turns latents back into
    images for the target classifier. See :mod:`diffmi_ray.models.autoencoder`.
    """

    pretrained: str | None = Field(
        None, description="A diffusers AutoencoderKL or VQModel: Hugging Face Hub id or local folder "
        "(from_pretrained; the class is read from its config.json). None: build `arch` and train it on the "
        "CDM's training images for `iterations` steps (offline / CPU-scale).")
    subfolder: str | None = Field(None, description="Subfolder of `pretrained` holding the autoencoder (e.g. vqvae).")
    image_size: int | None = Field(
        None, ge=8, description="Pixel size the autoencoder works at: images are resized to it before encoding, "
        "decoded images are resized to the data's image_size. None = the data's image_size (paper: 256).")
    scaling_factor: float | None = Field(
        None, gt=0.0, description="Latent scale s (the CDM sees z * s). None: 1 / std of the encoded training "
        "latents (LDM's scale_by_std); Stable Diffusion's VAE uses 0.18215.")
    arch: AutoencoderArchConfig = Field(default_factory=AutoencoderArchConfig)
    iterations: int = Field(2000, ge=0, description="Training steps of the autoencoder built from `arch` "
                            "(0 keeps the random initialisation: only for testing the code path).")
    batch_size: int = Field(32, ge=1, description="Autoencoder training batch.")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the autoencoder.")
    kl_weight: float = Field(1e-6, ge=0.0, description="Weight of the KL term (LDM's KL-regularised autoencoders: 1e-6).")
    encode_batch_size: int = Field(64, ge=1, description="Batch size when encoding the training images.")


class CDMPriorConfig(StrictModel):
    """Diff-MI step 1b: pretrain the CDM on pseudo-labelled public data."""

    unet: UNetConfig = Field(default_factory=UNetConfig)
    latent: LatentConfig | None = Field(
        None, description="Train the CDM in an autoencoder's latent space (Table VI); None = pixel space.")
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    iterations: int = Field(50_000, ge=1, description="Optimiser steps (paper 50k; 100k is better).")
    batch_size: int = Field(300, ge=1, description="Global batch (official: 150 per GPU on 2 GPUs).")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0, description="EMA decay of the weights used downstream.")
    null_prob: float = Field(0.1, ge=0.0, le=1.0,
                             description="Probability that a whole batch gets the null label (CFG training).")
    dequantize: bool = Field(True, description="Add U(0, 1/256) dequantisation noise.")
    hflip: bool = Field(True, description="Random horizontal flips.")
    use_all_public: bool = Field(
        False, description="Train on every public image with its top-1 pseudo-label instead of only the top-n "
        "selection (more data for tiny public sets).")
    checkpoint_every: int = Field(1000, ge=1, description="Save a resumable checkpoint every N steps.")
    checkpoint: str | None = Field(None, description="Load the Diff-MI authors' released CDM instead of training.")

    @model_validator(mode="after")
    def _released_is_pixel_space(self):
        if self.checkpoint and self.latent is not None:
            raise ValueError("checkpoint (the released pixel-space CDM) cannot be combined with latent")
        return self


class FinetuneConfig(StrictModel):
    """Diff-MI step 1c: target-specific fine-tuning through a short differentiable sampler."""

    enabled: bool = Field(True, description="Fine-tune the CDM on the target (Table X 'FT').")
    layers: int | list[int] = Field(
        5, description="Top-L middle-block layers by change rate (1..13), or an explicit list of layer indices.")
    probe_steps: int = Field(20, ge=1, description="Steps of the all-13-layer probe fine-tune measuring change rates.")
    sampler_steps: int = Field(10, ge=2, description="DPM-Solver++ 2M steps of the differentiable sampler.")
    guidance: float = Field(3.0, ge=0.0, description="CFG weight w (eps = w*eps(y) - (w-1)*eps(null)).")
    lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate.")
    batch_size: int = Field(4, ge=1, description="Samples per step.")
    classes: int | None = Field(None, ge=1, description="Fine-tune on classes 0..classes-1 (None = the attacked "
                                "classes, protocol.classes: 300 in the paper).")
    max_epochs: int = Field(100, ge=1, description="Epochs over the classes (an epoch = every class once).")
    acc_threshold: float = Field(0.99, gt=0.0, le=1.0, description="Stop when T's epoch accuracy on samples >= this.")
    aug_copies: int = Field(2, ge=1, description="Random augmentations per sample for L_cls.")
    official_intermediates: bool = Field(
        True, description="Use the official 8 tensors (x0-predictions of model evaluations 3..9 plus the final "
        "sample); False uses every step's x0-prediction.")
    grad_checkpointing: bool = Field(True, description="Recompute each solver step in backward (saves memory).")
    loss_k: int = Field(20, ge=0, description="k of the top-k loss used in fine-tuning.")
    loss_alpha: float = Field(1.0, ge=0.0, description="Weight of p-reg in fine-tuning's L_cls.")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, int):
            if not 1 <= v <= 13:
                raise ValueError("layers must be in 1..13 (number of middle-block layers)")
        else:
            if not v or any(not 1 <= i <= 13 for i in v) or len(set(v)) != len(v):
                raise ValueError("a layer list must hold distinct indices in 1..13")
        return v


class DiffMIAttackConfig(StrictModel):
    """Diff-MI step 2: iterative image reconstruction (IIR), denoise, PGD."""

    iterations: int = Field(30, ge=1, description="IIR iterations N.")
    lr: float = Field(1.0, gt=0.0, description="Adamax learning rate on the pixel tensor.")
    loss: Literal["topk_preg", "ce", "max_margin"] = Field("topk_preg", description="L_cls (Table X).")
    k: int = Field(20, ge=0, description="k of the top-k loss (k=1 is max-margin); must be < #classes.")
    alpha: float = Field(1.0, ge=0.0, description="Weight of the p-reg loss.")
    guidance: float = Field(3.0, ge=0.0, description="CFG weight w of the prior step and the denoise.")
    aug_copies: int = Field(4, ge=1, description="Augmented copies in the attack step.")
    clip_factor: float = Field(1.25, gt=0.0, description="Clip the attack gradient norm to this x running prior norm.")
    clip_ema: float = Field(0.5, ge=0.0, le=1.0, description="EMA factor of the running prior gradient norm.")
    t_max: float = Field(1000.0, description="Upper end of the annealed t-schedule (in units of T=1000).")
    t_min: float = Field(200.0, description="Lower end of the annealed t-schedule (in units of T=1000).")
    t_jitter: int = Field(50, ge=0, description="Uniform integer jitter of t_i (units of T=1000).")
    renoise_t: int = Field(100, ge=0, description="Re-noise to this timestep before the final denoise (0 = skip).")
    ddim_steps: int = Field(10, ge=1, description="DDIM steps of the final denoise.")
    ddim_eta: float = Field(1.0, ge=0.0, description="DDIM eta of the final denoise.")
    pgd: PGDConfig = Field(default_factory=PGDConfig)
    batch_size: int = Field(16, ge=1, description="Images reconstructed together.")


class DiffMIConfig(StrictModel):
    prior_kind: ClassVar[str] = "cdm"
    uses_pseudo_labels: ClassVar[bool] = True
    uses_target_in_prior: ClassVar[bool] = True

    prior: CDMPriorConfig = Field(default_factory=CDMPriorConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    attack: DiffMIAttackConfig = Field(default_factory=DiffMIAttackConfig)


# ------------------------------------------------------------------------------------------- GMI


class GMIPriorConfig(StrictModel):
    """GMI: DCGAN generator + WGAN-GP critic on public data."""

    arch: GANArchConfig = Field(default_factory=GANArchConfig)
    train: GANTrainConfig = Field(default_factory=GANTrainConfig)
    lambda_gp: float = Field(10.0, ge=0.0, description="Gradient-penalty weight.")


class GMIAttackConfig(StrictModel):
    iterations: int = Field(1500, ge=1, description="Latent optimisation steps.")
    lr: float = Field(0.02, gt=0.0, description="SGD learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    lambda_id: float = Field(100.0, ge=0.0, description="Weight of CE(T(G(z)), y) against the prior loss -D(G(z)).")
    restarts: int = Field(5, ge=1, description="Random restarts; the best by T score is kept.")
    clamp: float = Field(1.0, gt=0.0, description="z is clamped to [-clamp, clamp] after each step.")
    batch_size: int = Field(64, ge=1, description="Images optimised together.")


class GMIConfig(StrictModel):
    prior_kind: ClassVar[str] = "gan_wgangp"
    uses_pseudo_labels: ClassVar[bool] = False
    uses_target_in_prior: ClassVar[bool] = False

    prior: GMIPriorConfig = Field(default_factory=GMIPriorConfig)
    attack: GMIAttackConfig = Field(default_factory=GMIAttackConfig)


# ------------------------------------------------------------------------------------------- KED-MI


class KEDMIPriorConfig(StrictModel):
    """KED-MI: inversion-specific GAN; D also learns T's soft labels on public data."""

    arch: GANArchConfig = Field(default_factory=lambda: GANArchConfig(discriminator="kedmi_discriminator"))
    train: GANTrainConfig = Field(default_factory=lambda: GANTrainConfig(epochs=120, n_critic=5))
    entropy_weight: float = Field(1e-4, ge=0.0, description="Weight of the generator entropy term.")
    feature_matching: bool = Field(True, description="Generator feature-matching loss on D's features.")


class KEDMIAttackConfig(StrictModel):
    iterations: int = Field(2400, ge=1, description="Optimisation steps of the per-class Gaussian (PLG-MI's copy: 1500).")
    lr: float = Field(0.02, gt=0.0, description="Adam learning rate on (mu, logvar).")
    lambda_id: float = Field(100.0, ge=0.0, description="Weight of the identity CE loss.")
    restarts: int = Field(1, ge=1, description="Independent distributions learned per class (best by T score kept).")
    batch_size: int = Field(64, ge=1, description="Latent samples per step per class.")


class KEDMIConfig(StrictModel):
    prior_kind: ClassVar[str] = "gan_kedmi"
    uses_pseudo_labels: ClassVar[bool] = False
    uses_target_in_prior: ClassVar[bool] = True

    prior: KEDMIPriorConfig = Field(default_factory=KEDMIPriorConfig)
    attack: KEDMIAttackConfig = Field(default_factory=KEDMIAttackConfig)


# ------------------------------------------------------------------------------------------- PLG-MI


class PLGMIPriorConfig(StrictModel):
    """PLG-MI: conditional ResNet G (cond. BN) + SN projection D on top-n pseudo-labelled public data."""

    arch: GANArchConfig = Field(default_factory=lambda: GANArchConfig(
        generator="plgmi_generator", discriminator="plgmi_discriminator", z_dim=128))
    train: GANTrainConfig = Field(default_factory=lambda: GANTrainConfig(
        iterations=30_000, betas=(0.0, 0.9), n_critic=5))
    alpha: float = Field(0.2, ge=0.0, description="Weight of max-margin(T(aug(G(z,y))), y) in the G loss.")


class PLGMIAttackConfig(StrictModel):
    iterations: int = Field(600, ge=1, description="Adam steps on z.")
    lr: float = Field(0.1, gt=0.0, description="Adam learning rate.")
    aug_views: int = Field(2, ge=1, description="Augmented views of each image in the loss.")
    restarts: int = Field(5, ge=1, description="Random seeds per image; the best by T score is kept.")
    batch_size: int = Field(64, ge=1, description="Images optimised together.")


class PLGMIConfig(StrictModel):
    prior_kind: ClassVar[str] = "gan_plgmi"
    uses_pseudo_labels: ClassVar[bool] = True
    uses_target_in_prior: ClassVar[bool] = True

    prior: PLGMIPriorConfig = Field(default_factory=PLGMIPriorConfig)
    attack: PLGMIAttackConfig = Field(default_factory=PLGMIAttackConfig)


# ------------------------------------------------------------------------------------------- VMI


class VMIAttackConfig(StrictModel):
    flow_steps: int = Field(10, ge=1, description="Flow steps K per level.")
    flow_levels: int = Field(3, ge=1, description="Flow levels L.")
    lambda_kl: float = Field(1e-3, ge=0.0, description="Weight of KL(q || N(0, I)).")
    lr: float = Field(1e-4, gt=0.0, description="SGD learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    batch_size: int = Field(64, ge=1, description="Latent samples per step.")
    steps: int = Field(4900, ge=1, description="Optimisation steps per class.")


class VMIConfig(StrictModel):
    """VMI: per-class flow over a public-data generator's latent (StyleGAN2 at paper scale; here the
    public-data DCGAN/WGAN-GP prior, the CPU-scale choice the config names)."""

    prior_kind: ClassVar[str] = "gan_wgangp"
    uses_pseudo_labels: ClassVar[bool] = False
    uses_target_in_prior: ClassVar[bool] = False

    prior: GMIPriorConfig = Field(default_factory=GMIPriorConfig)
    attack: VMIAttackConfig = Field(default_factory=VMIAttackConfig)


# ------------------------------------------------------------------------------------------- PPA


class PPAAttackConfig(StrictModel):
    candidates: int = Field(5000, ge=1, description="Latents sampled for the initial selection.")
    keep: int = Field(200, ge=1, description="Top candidates per class kept by T confidence.")
    iterations: int = Field(70, ge=1, description="Adam steps on the latents.")
    lr: float = Field(0.005, gt=0.0, description="Adam learning rate.")
    betas: tuple[float, float] = Field((0.1, 0.1), description="Adam betas.")
    final_transforms: int = Field(100, ge=1, description="Random transforms of the final selection.")
    crop_scale: tuple[float, float] = Field((0.5, 0.9), description="Random resized crop scale range.")
    batch_size: int = Field(64, ge=1, description="Latents optimised together.")


class PPAConfig(StrictModel):
    """PPA: a pretrained public-data generator (StyleGAN2 at paper scale; the public-data GAN here)."""

    prior_kind: ClassVar[str] = "gan_wgangp"
    uses_pseudo_labels: ClassVar[bool] = False
    uses_target_in_prior: ClassVar[bool] = False

    prior: GMIPriorConfig = Field(default_factory=GMIPriorConfig)
    attack: PPAAttackConfig = Field(default_factory=PPAAttackConfig)


METHOD_CONFIGS: dict[str, type[StrictModel]] = {
    "diff_mi": DiffMIConfig,
    "gmi": GMIConfig,
    "kedmi": KEDMIConfig,
    "plgmi": PLGMIConfig,
    "vmi": VMIConfig,
    "ppa": PPAConfig,
}
METHODS = tuple(METHOD_CONFIGS)
