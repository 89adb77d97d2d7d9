"""Class-conditional U-Net in the guided-diffusion layout (the CDM of Diff-MI).

The module tree and the parameter names follow openai/guided-diffusion's ``UNetModel`` so the
Diff-MI authors' checkpoints load with ``load_state_dict(strict=True)``
(``../shared/manifests/diffmi_unet_64.json``; checked by ``tests/test_unet.py``)::

    time_embed      Linear(C, 4C) - SiLU - Linear(4C, 4C) on a C-d sinusoidal embedding of t
    label_emb       Embedding(num_classes + 1, 4C); row ``num_classes`` is the null class (CFG)
    input_blocks    [conv_in] + per level: num_res_blocks x (ResBlock [+ AttentionBlock]) [+ Downsample]
    middle_block    ResBlock, AttentionBlock, ResBlock
    output_blocks   per level (reversed): (num_res_blocks + 1) x (ResBlock(skip concat) [+ Attn]) [+ Upsample]
    out             GroupNorm32 - SiLU - Conv3x3 (zero-initialised)

Forward contract: ``unet(x, t, y) -> eps``

- ``x``: (B, in_channels, H, W) noisy image in the diffusion space [-1, 1];
- ``t``: 0-based timesteps (0 = least noisy), a Python number, a 0-d tensor, shape (1,) or (B,),
  integer or float dtype (fractional times are fine: the embedding is continuous);
- ``y``: (B,) long class indices in 0..num_classes, where ``num_classes`` is the null label;
  ``None`` means the null label for the whole batch;
- returns the predicted noise eps with x's shape (out_channels defaults to in_channels).

Fig. 6a of the paper numbers the 13 parameterised layers of the middle block; see
:func:`middle_block_layers` and :func:`finetune_parameter_names` for the mapping used by Diff-MI's
fine-tuning step.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffmi_ray.models.registry import register

__all__ = [
    "UNetModel",
    "timestep_embedding",
    "middle_block_layers",
    "finetune_parameter_names",
    "OFFICIAL_FINETUNE_LAYERS",
    "NUM_MIDDLE_LAYERS",
]

# Paper Fig. 6a: the five middle-block layers with the highest change rate, fine-tuned by default.
OFFICIAL_FINETUNE_LAYERS: tuple[int, ...] = (2, 4, 8, 10, 12)
NUM_MIDDLE_LAYERS = 13


# ----------------------------------------------------------------------------------------------
# building blocks


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32 (stable under fp16/bf16 autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _zeroed(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place: residual branches start as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    t: (B,) any real dtype. Returns (B, dim) float32 laid out as [cos(t f_0..f_{h-1}) | sin(...)]
    with f_i = max_period^(-i/h), h = dim // 2 (the guided-diffusion layout; a zero column pads odd dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _Block(nn.Module):
    """A block that needs the embedding; runs under gradient checkpointing when asked."""

    use_checkpoint: bool = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for p in self.parameters())):
            # Non-reentrant checkpointing: activations are recomputed in backward; works with
            # frozen inputs and parameter subsets, and with torch.autograd.grad.
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):  # pragma: no cover - abstract
        raise NotImplementedError


class ResBlock(_Block):
    """Residual block with scale-shift conditioning on the time(+label) embedding.

    h = conv3x3(SiLU(GN(x)));  (scale, shift) = Linear(SiLU(emb)) split in two;
    h = conv3x3_zero(Dropout(SiLU(GN(h) * (1 + scale) + shift)));  out = skip(x) + h,
    skip = Identity when channels match, else Conv1x1. Shapes: x (B, C_in, H, W), emb (B, E)
    -> (B, C_out, H, W). Submodule indices match guided-diffusion (in_layers.2 is the first conv,
    out_layers.3 the second, emb_layers.1 the Linear).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, norm_groups: int = 32, use_checkpoint: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def _forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, 2C or C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(_Block):
    """Spatial self-attention with guided-diffusion's legacy QKV head layout.

    x (B, C, H, W) -> flatten to (B, C, T), T = H*W; qkv = Conv1d(C, 3C, 1)(GN(x)); the 3C channels
    are split HEAD-first: reshape to (B*heads, 3*d, T) and then into q, k, v of (B*heads, d, T) each,
    d = C / heads ("legacy" order, what the shared checkpoints were trained with). Softmax attention
    with scale 1/sqrt(d); proj_out (zero-initialised Conv1d) and a residual connection.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int | None = None,
                 norm_groups: int = 32, use_checkpoint: bool = False):
        super().__init__()
        if num_head_channels:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} not divisible by num_head_channels "
                                 f"{num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def _forward(self, x, emb=None):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        d = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * d, -1).split(d, dim=1)  # 3 x (B*h, d, T)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B*h, T, d)
        h = a.transpose(1, 2).reshape(b, c, -1)  # (B, C, T)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (key ``op``): (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (key ``conv``): (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """nn.Sequential whose children receive the embedding when they take one."""

    def forward(self, x, emb=None):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (_Block, Downsample, Upsample)) else layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# the model


class UNetModel(nn.Module):
    """Class-conditional eps-prediction U-Net (guided-diffusion layout, see the module docstring).

    Args:
        num_classes: number of real classes; the label embedding has ``num_classes + 1`` rows and
            label ``num_classes`` is the null (unconditional) class.
        image_size: square input size in pixels; must be divisible by 2**(len(channel_mult) - 1).
        in_channels / out_channels: image channels (out defaults to in: eps has x's shape).
        model_channels: base width C; level i has C * channel_mult[i] channels; embeddings are 4C wide.
        channel_mult: width multiplier per resolution level (one Downsample between levels).
        num_res_blocks: ResBlocks per level in the encoder (the decoder has one more per level).
        attention_resolutions: feature-map sizes IN PIXELS at which AttentionBlocks follow the
            ResBlocks (paper: (16, 8) at 64 px). guided-diffusion's downsample rates ds relate by
            pixels = image_size // ds.
        num_heads / num_head_channels: attention heads, or a fixed width per head (overrides heads).
        dropout: dropout probability inside ResBlocks.
        use_scale_shift_norm: FiLM-style conditioning (True in the paper) instead of adding emb.
        norm_groups: GroupNorm groups (32 in guided-diffusion; every width must be divisible by it).
        use_checkpoint: gradient checkpointing of every ResBlock / AttentionBlock
            (``torch.utils.checkpoint``, non-reentrant); see :meth:`set_gradient_checkpointing`.
    """

    def __init__(self, num_classes: int, *, image_size: int = 64, in_channels: int = 3,
                 out_channels: int | None = None, model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), num_res_blocks: int = 3,
                 attention_resolutions: Iterable[int] = (16, 8), num_heads: int = 4,
                 num_head_channels: int | None = None, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, norm_groups: int = 32, use_checkpoint: bool = False):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        _check_config(num_classes, image_size, model_channels, channel_mult, num_res_blocks,
                      attention_resolutions, norm_groups)
        self.num_classes = int(num_classes)
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.num_heads = num_heads
        emb_dim = 4 * model_channels

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(self.num_classes + 1, emb_dim)

        def res(cin, cout):
            return ResBlock(cin, emb_dim, cout, dropout, use_scale_shift_norm, norm_groups, use_checkpoint)

        def attn(ch):
            return AttentionBlock(ch, num_heads, num_head_channels, norm_groups, use_checkpoint)

        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        size = image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if size in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                size //= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if size in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    size *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(norm_groups, ch), nn.SiLU(),
                                 _zeroed(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    @property
    def null_label(self) -> int:
        return self.num_classes

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Turn per-block gradient checkpointing on/off (recompute activations in backward)."""
        for m in self.modules():
            if isinstance(m, _Block):
                m.use_checkpoint = bool(enabled)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps prediction. x (B, C, H, W) in [-1, 1]; t 0-based timesteps (scalar, (1,) or (B,));
        y (B,) long in 0..num_classes (num_classes = null; None = null for all). -> (B, C_out, H, W)."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar, (1,) or (B,)={b}, got shape {tuple(t.shape)}")
        if y is None:
            y = torch.full((b,), self.null_label, dtype=torch.long, device=x.device)
        elif y.shape != (b,):
            raise ValueError(f"y must have shape (B,)=({b},), got {tuple(y.shape)}")
        w = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(w.dtype))
        emb = emb + self.label_emb(y)  # (B, 4C)

        h = x.to(w.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)


def _check_config(num_classes, image_size, model_channels, channel_mult, num_res_blocks,
                  attention_resolutions, norm_groups) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not channel_mult or num_res_blocks < 1 or model_channels < 1:
        raise ValueError("channel_mult must be non-empty, num_res_blocks and model_channels >= 1")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} must be divisible by 2**(len(channel_mult)-1) = {factor}")
    for m in channel_mult:
        if (model_channels * m) % norm_groups:
            raise ValueError(f"width model_channels*mult = {model_channels * m} is not divisible by "
                             f"norm_groups = {norm_groups}")
    sizes = {image_size // 2 ** i for i in range(len(channel_mult))}
    bad = [r for r in attention_resolutions if r not in sizes]
    if bad:
        raise ValueError(f"attention_resolutions {bad} (pixels) are not feature-map sizes of this U-Net; "
                         f"valid: {sorted(sizes, reverse=True)}")


# ----------------------------------------------------------------------------------------------
# Fig. 6a middle-block layer indexing (Diff-MI fine-tuning)

# Order of the five parameterised layers inside a middle ResBlock, as numbered in the paper's
# Fig. 2 (GroupNorm_1, 2D Conv_2, GroupNorm_3, 2D Conv_4, Linear_5; second block 9..13) and the
# attention block (GroupNorm_6, Attention_7 = the qkv projection, 1D Conv_8 = proj_out).
_RES_LAYERS = ("in_layers.0", "in_layers.2", "out_layers.0", "out_layers.3", "emb_layers.1")
_ATTN_LAYERS = ("norm", "qkv", "proj_out")


def middle_block_layers(unet: UNetModel) -> list[tuple[int, str, list[str]]]:
    """The 13 parameterised layers of the middle block, numbered as in the paper (Fig. 2 / 6a).

    Returns [(index 1..13, module name, [parameter names])]:

    ====  ==============================  =========================
    idx   module                          what
    ====  ==============================  =========================
    1     middle_block.0.in_layers.0      GroupNorm (ResBlock 1)
    2     middle_block.0.in_layers.2      first 3x3 conv
    3     middle_block.0.out_layers.0     GroupNorm (scale-shift)
    4     middle_block.0.out_layers.3     second 3x3 conv
    5     middle_block.0.emb_layers.1     Linear (emb -> scale, shift)
    6     middle_block.1.norm             GroupNorm (attention)
    7     middle_block.1.qkv              1x1 Conv1d to q, k, v
    8     middle_block.1.proj_out         1x1 Conv1d output projection
    9-13  middle_block.2.*                as 1-5 for ResBlock 2
    ====  ==============================  =========================

    Source: the paper's Fig. 2 labels the middle-block layers exactly so (the GroupNorms are odd
    numbers 1, 3, 9, 11 and 6, the Linear layers 5 and 13). Its Fig. 6a top-5 (2, 4, 8, 10, 12)
    then equals the official fine-tuning selection (the two 3x3 convs of each middle ResBlock and
    the attention proj_out; manifest ``finetune_trained_parameters``), and the official code's
    commented-out "all middle-block layers except norms" alternative counts 8 = 13 - 5 norms.
    Note this is not the state_dict order (there emb_layers.1 precedes out_layers.*).
    """
    names = dict(unet.named_parameters())
    groups = [("middle_block.0", _RES_LAYERS), ("middle_block.1", _ATTN_LAYERS), ("middle_block.2", _RES_LAYERS)]
    out = []
    for block, layers in groups:
        for layer in layers:
            mod = f"{block}.{layer}"
            params = [n for n in names if n.startswith(mod + ".")]
            if not params:
                raise ValueError(f"{type(unet).__name__} has no parameters under {mod!r}; "
                                 "not a guided-diffusion-layout U-Net")
            out.append((len(out) + 1, mod, params))
    return out


def finetune_parameter_names(unet: UNetModel, layers: Iterable[int] = OFFICIAL_FINETUNE_LAYERS,
                             include_label_emb: bool = True) -> list[str]:
    """Names of the parameters Diff-MI fine-tunes: label_emb.weight + the given middle-block layers.

    ``layers`` are Fig. 6a indices in 1..13 (default: the official (2, 4, 8, 10, 12), which gives
    exactly the official 11 tensors / 10,214,400 elements at paper scale). Returned in the model's
    ``named_parameters`` order, so the list is stable whatever order ``layers`` is given in.
    """
    layers = set(int(i) for i in layers)
    bad = sorted(i for i in layers if not 1 <= i <= NUM_MIDDLE_LAYERS)
    if bad:
        raise ValueError(f"middle-block layer indices must be in 1..{NUM_MIDDLE_LAYERS}, got {bad}")
    chosen = {p for i, _, params in middle_block_layers(unet) if i in layers for p in params}
    if include_label_emb:
        chosen.add("label_emb.weight")
    return [n for n, _ in unet.named_parameters() if n in chosen]


# ----------------------------------------------------------------------------------------------
# registry


@register("diffmi_unet_64", kind="unet", image_sizes=(64,), channels=(3,),
          description="Diff-MI CDM: guided-diffusion U-Net, 64 px, 128 ch, mult (1,2,3,4), 3 res blocks, "
                      "attention at 16 and 8 px, 4 heads, scale-shift norm (121.6M params at 1000 classes); "
                      "loads the authors' checkpoints")
def diffmi_unet_64(num_classes: int = 1000, *, use_checkpoint: bool = False, dropout: float = 0.0) -> UNetModel:
    """The paper's CDM (state_dict identical to the shared checkpoint at num_classes=1000)."""
    return UNetModel(num_classes, image_size=64, in_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
                     num_res_blocks=3, attention_resolutions=(16, 8), num_heads=4, dropout=dropout,
                     use_scale_shift_norm=True, use_checkpoint=use_checkpoint)


@register("cdm_unet", kind="unet", min_size=1,
          description="configurable class-conditional guided-diffusion U-Net (kw: image_size, in_channels, "
                      "model_channels, channel_mult, num_res_blocks, attention_resolutions in pixels, num_heads, "
                      "num_head_channels, dropout, norm_groups, use_checkpoint)")
def cdm_unet(num_classes: int, *, image_size: int = 32, in_channels: int = 1, model_channels: int = 32,
             channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
             attention_resolutions: Iterable[int] = (8,), num_heads: int = 4, num_head_channels: int | None = None,
             dropout: float = 0.0, use_scale_shift_norm: bool = True, norm_groups: int = 32,
             use_checkpoint: bool = False, out_channels: int | None = None) -> UNetModel:
    """Any-size CDM; defaults are a small CPU-scale net (32 px, 1 channel).

    ``attention_resolutions`` are feature-map sizes in pixels (e.g. (16, 8) at 64 px = guided-diffusion
    "16,8"). image_size must be divisible by 2**(len(channel_mult)-1).
    """
    return UNetModel(num_classes, image_size=image_size, in_channels=in_channels, out_channels=out_channels,
                     model_channels=model_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                     attention_resolutions=attention_resolutions, num_heads=num_heads,
                     num_head_channels=num_head_channels, dropout=dropout,
                     use_scale_shift_norm=use_scale_shift_norm, norm_groups=norm_groups,
                     use_checkpoint=use_checkpoint)
