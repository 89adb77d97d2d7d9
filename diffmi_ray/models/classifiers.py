"""Image classifiers: target and evaluation models, registered in :mod:`diffmi_ray.models.registry`.

Contract shared by every classifier here (see :mod:`diffmi_ray.conventions`):

* Input ``x``: float tensor (B, C, H, W) with values in [0, 1]; no mean/std normalisation is applied
  anywhere (the community checkpoints were trained that way).
* ``forward(x)`` -> logits (B, num_classes), pre-softmax.
* ``features(x)`` -> penultimate features (B, feature_dim); ``logits_from_features(f)`` maps them to
  logits, so ``forward(x) == logits_from_features(features(x))``.
* ``features_and_logits(x)`` -> (features, logits) from one pass.
* ``forward_with_hidden(x)`` -> (hidden, logits) where ``hidden`` is a list of flattened block outputs
  (B, D_j), shallow to deep, the last one being the penultimate feature. ``hidden_features(x)``
  returns only the list. BiDO (:mod:`diffmi_ray.defenses.bido`) regularises these.
* Through a DDP/DataParallel wrapper use ``model(x, return_hidden=True)`` / ``model(x,
  return_features=True)`` (same results as the two methods above): only ``__call__`` is synchronised.
* Attributes ``num_classes``, ``feature_dim``, ``in_channels``, ``image_size`` (the size the geometry
  was built for, or None when the model takes any size >= its registry ``min_size``).

Constructor keywords common to all: ``in_channels`` (default 3), ``image_size`` (fixed-geometry
models -- vgg16, ir152, facenet64 -- build their flatten layer for it, default 64, and reject other
input sizes; the others take any size, resize inside or pool adaptively, and accept the keyword only
for a uniform signature), ``pretrained`` (False; True loads torchvision ImageNet weights for the
torchvision-based models and raises :class:`UserError` when they cannot be fetched, never falling
back to random weights; other models refuse it). The registry entry of every classifier has
``extra["data_kwargs"] == ("in_channels", "image_size")``: the keywords a caller fills from the
dataset's channel count and image size.

Checkpoint compatibility: ``kedmi_vgg16``, ``kedmi_ir152``, ``kedmi_facenet64`` and
``kedmi_facenet_eval`` (= ``vgg16``, ``ir152``, ``facenet64``, ``facenet_eval`` at their community
settings) have exactly the state_dict keys and shapes of the KED-MI / Diff-MI checkpoints listed in
``shared/manifests``; the torchvision-based ``resnet18``/``resnet34``/``inception_v3_eval`` keep
torchvision's key names. Load files with :func:`diffmi_ray.models.checkpoints.load_into`.
"""

from __future__ import annotations

import os
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmi_ray.errors import UserError
from diffmi_ray.models.registry import register

_DATA_KWARGS = ("in_channels", "image_size")


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Base of every classifier: the shared API on top of one method, :meth:`_trunk`.

    Subclasses implement ``_trunk(x, hidden)`` (x already checked/resized; append flattened block
    outputs to ``hidden`` when it is a list; return the penultimate features (B, feature_dim)) and
    ``head`` (the final ``nn.Linear``). ``_prepare(x)`` checks the input and resizes it where the
    model has a fixed internal resolution.
    """

    num_classes: int
    feature_dim: int
    in_channels: int
    image_size: int | None
    #: internal resolution inputs are bilinearly resized to (None = no resizing)
    resize_to: int | None = None

    # -- to implement ---------------------------------------------------------------------------
    def _trunk(self, x: Tensor, hidden: list[Tensor] | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def head(self) -> nn.Linear:  # pragma: no cover
        """The final linear layer: features (B, feature_dim) -> logits (B, num_classes)."""
        raise NotImplementedError

    # -- shared API -----------------------------------------------------------------------------
    def _prepare(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} was built for {self.in_channels} input channel(s), "
                             f"got {x.shape[1]} (shape {tuple(x.shape)})")
        if self.resize_to is not None:
            if x.shape[-2:] != (self.resize_to, self.resize_to):
                x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        elif self.image_size is not None and x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"{type(self).__name__} was built for {self.image_size}x{self.image_size} inputs "
                             f"(constructor keyword image_size), got {tuple(x.shape[-2:])}")
        return x

    def logits_from_features(self, feats: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) -> logits (B, num_classes)."""
        return self.head(feats)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) of images x (B, C, H, W) in [0, 1]."""
        return self._trunk(self._prepare(x), None)

    def forward(self, x: Tensor, *, return_features: bool = False, return_hidden: bool = False):
        """Logits (B, num_classes) of images x (B, C, H, W) in [0, 1].

        The flags exist for wrapped models (DDP synchronises gradients only through ``__call__``):
        ``return_features=True`` -> (features, logits) as :meth:`features_and_logits`;
        ``return_hidden=True`` -> (hidden, logits) as :meth:`forward_with_hidden`.
        """
        if return_hidden and return_features:
            raise ValueError("pass return_hidden or return_features, not both (hidden[-1] is the feature)")
        if return_hidden:
            return self.forward_with_hidden(x)
        if return_features:
            return self.features_and_logits(x)
        return self.logits_from_features(self.features(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(features (B, feature_dim), logits (B, num_classes)) from one forward pass."""
        f = self.features(x)
        return f, self.logits_from_features(f)

    def forward_with_hidden(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """(hidden, logits): flattened block outputs [(B, D_1), ..., (B, feature_dim)] and logits."""
        hidden: list[Tensor] = []
        f = self._trunk(self._prepare(x), hidden)
        hidden.append(f)
        return hidden, self.logits_from_features(f)

    def hidden_features(self, x: Tensor) -> list[Tensor]:
        """Flattened block outputs, shallow to deep; the last is the penultimate feature (B, feature_dim)."""
        return self.forward_with_hidden(x)[0]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
                f"in_channels={self.in_channels}, image_size={self.image_size}")


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _check_size(name: str, image_size: int, multiple: int) -> None:
    if image_size < multiple or image_size % multiple:
        raise ValueError(f"{name}: image_size must be a positive multiple of {multiple}, got {image_size}")


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise UserError(
            f"model '{name}' has no downloadable pretrained weights here; train it, or load a checkpoint "
            "(e.g. a KED-MI / Face.evoLVe file) with diffmi_ray.models.checkpoints.load_into")


# ----------------------------------------------------------------------------------------------
# Pretrained (torchvision ImageNet) weights
# ----------------------------------------------------------------------------------------------


def _fetch_torchvision_weights(weights, model_name: str) -> dict[str, Tensor]:
    """Download (or read from the torch hub cache) a torchvision ``WeightsEnum`` entry.

    Raises UserError naming the weights, the expected file and where to put it when it cannot be
    obtained (offline node, blocked URL, corrupt cache file).
    """
    url = weights.url
    filename = os.path.basename(urlparse(url).path)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, map_location="cpu")
    except Exception as e:  # URLError, HTTPError, OSError, hash mismatch (RuntimeError) ...
        raise UserError(
            f"model '{model_name}' with pretrained=True needs the torchvision ImageNet weights "
            f"{type(weights).__name__}.{weights.name} (file '{filename}', from {url}), which could not be "
            f"loaded: {type(e).__name__}: {e}. Download that file on a machine with internet access and put "
            f"it into the torch hub cache '{cache}' (that is $TORCH_HOME/hub/checkpoints; set TORCH_HOME to "
            f"a shared folder holding it on every node), or set pretrained=False to train from random "
            f"initialisation.") from e


def _adapt_first_conv(w: Tensor, in_channels: int) -> Tensor:
    """ImageNet RGB conv weight (O, 3, k, k) -> (O, in_channels, k, k), keeping the summed response."""
    if in_channels == w.shape[1]:
        return w
    return w.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels


def _load_pretrained(model: nn.Module, src: dict[str, Tensor], rename: Callable[[str], str | None],
                     first_conv: str, required: Callable[[str], bool]) -> None:
    """Copy the pretrained tensors ``src`` into ``model``.

    ``rename`` maps a source key to a model key (None = skip it). The first conv is adapted to the
    model's ``in_channels``; a tensor whose shape still differs (the final linear layer when
    num_classes != 1000) keeps its random init. Every model key for which ``required(key)`` holds must
    be covered, else RuntimeError (a wiring bug, not a user error).
    """
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    for k, v in src.items():
        nk = rename(k)
        if nk is None:
            continue
        if nk not in own:
            raise RuntimeError(f"pretrained key {k!r} -> {nk!r} has no counterpart in {type(model).__name__}")
        if nk == first_conv:
            v = _adapt_first_conv(v, own[nk].shape[1])
        if v.shape == own[nk].shape:
            out[nk] = v
    missing = [k for k in own if required(k) and k not in out]
    if missing:
        raise RuntimeError(f"pretrained weights leave {len(missing)} tensors of {type(model).__name__} "
                           f"uninitialised, e.g. {missing[:3]}")
    model.load_state_dict(out, strict=False)


# ----------------------------------------------------------------------------------------------
# VGG16 (KED-MI target)
# ----------------------------------------------------------------------------------------------

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_bn_features(in_channels: int) -> nn.Sequential:
    """torchvision ``vgg16_bn().features`` layout (same indices): 13 x [conv3x3, BN, ReLU], 5 max-pools."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    seq = nn.Sequential(*layers)
    for m in seq.modules():  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return seq


class VGG16(Classifier):
    """VGG16-BN target (KED-MI ``VGG16``): vgg16_bn features -> flatten -> BatchNorm1d -> Linear.

    At 64x64 the flattened feature is 512*2*2 = 2048-d (512*(s/32)^2 in general). The feature is the
    BatchNorm1d output, whose bias is frozen (``requires_grad=False``, still a state_dict key) as in
    the community model. Hidden list: outputs of the first four pooling stages, then the feature.

    Keys: ``feature.<i>.*`` (torchvision indices), ``bn.*``, ``fc_layer.*``.
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, image_size: int | None = None,
                 pretrained: bool = False):
        super().__init__()
        image_size = 64 if image_size is None else int(image_size)
        _check_size("vgg16", image_size, 32)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.feature_dim = 512 * (image_size // 32) ** 2
        self.feature = _vgg16_bn_features(in_channels)
        self.bn = nn.BatchNorm1d(self.feature_dim)
        self.bn.bias.requires_grad_(False)
        self.fc_layer = nn.Linear(self.feature_dim, num_classes)
        if pretrained:
            from torchvision.models import VGG16_BN_Weights
            src = _fetch_torchvision_weights(VGG16_BN_Weights.IMAGENET1K_V1, "vgg16")
            _load_pretrained(self, src, lambda k: "feature." + k[len("features."):] if k.startswith("features.")
                             else None, first_conv="feature.0.weight", required=lambda k: k.startswith("feature."))

    @property
    def head(self) -> nn.Linear:
        return self.fc_layer

    def _trunk(self, x, hidden):
        pools = 0
        for layer in self.feature:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                pools += 1
                if hidden is not None and pools < 5:
                    hidden.append(_flat(x))
        return self.bn(_flat(x))


# ----------------------------------------------------------------------------------------------
# Face.evoLVe IR backbones (IR-152 / IR-50): KED-MI IR152, FaceNet64, FaceNet (evaluation)
# ----------------------------------------------------------------------------------------------

_IR_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
_IR_DEPTHS = (64, 128, 256, 512)


class IRUnit(nn.Module):
    """Face.evoLVe ``bottleneck_IR`` unit: out = res(x) + shortcut(x).

    res = BN(in), conv3x3(in, d), PReLU(d), conv3x3(d, d, stride), BN(d). The shortcut is
    MaxPool2d(1, stride) (a parameter-free subsampling) when in == d, else conv1x1(stride) + BN.
    """

    def __init__(self, cin: int, depth: int, stride: int):
        super().__init__()
        # registration order fixes the state_dict key order: shortcut first, as in the checkpoints
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def _ir_output_layer(spatial: int) -> nn.Sequential:
    """BN2d(512), Dropout(0.5), Flatten, Linear(512*s*s, 512), BN1d(512): (B,512,s,s) -> (B,512)."""
    return nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(), nn.Flatten(),
                         nn.Linear(512 * spatial * spatial, 512), nn.BatchNorm1d(512))


class IRBackbone(nn.Module):
    """Face.evoLVe IR body: input layer (conv3x3 -> BN -> PReLU, 64 ch, stride 1), then four stages
    of :class:`IRUnit` (64/128/256/512 channels, first unit of each stride 2): (B,C,s,s) -> (B,512,s/16,s/16).

    ``output_spatial``: if given, the output layer (see :func:`_ir_output_layer`) lives inside the
    backbone as ``output_layer`` (the 112 px evaluation FaceNet layout), registered before ``body`` so
    the key order matches that checkpoint.
    """

    def __init__(self, num_layers: int, in_channels: int = 3, output_spatial: int | None = None):
        super().__init__()
        if num_layers not in _IR_UNITS:
            raise ValueError(f"IR backbone depth must be one of {sorted(_IR_UNITS)}, got {num_layers}")
        self.input_layer = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                         nn.PReLU(64))
        if output_spatial is not None:
            self.output_layer = _ir_output_layer(output_spatial)
        units: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index of the last unit of each stage
        cin = 64
        for depth, n in zip(_IR_DEPTHS, _IR_UNITS[num_layers]):
            units.append(IRUnit(cin, depth, 2))
            units += [IRUnit(depth, depth, 1) for _ in range(n - 1)]
            cin = depth
            self.stage_ends.append(len(units) - 1)
        self.body = nn.Sequential(*units)

    def forward_body(self, x: Tensor, hidden: list[Tensor] | None = None) -> Tensor:
        """Input layer + body: (B,C,s,s) -> (B,512,s/16,s/16); appends each stage's flattened output."""
        x = self.input_layer(x)
        ends = set(self.stage_ends)
        for i, unit in enumerate(self.body):
            x = unit(x)
            if hidden is not None and i in ends:
                hidden.append(_flat(x))
        return x


class _FaceEvolve64(Classifier):
    """KED-MI IR152 / FaceNet64 layout: ``feature`` (IR body), ``output_layer`` -> 512-d feature, ``fc_layer``.

    Default geometry 64x64 (body output 512x4x4, Linear 8192 -> 512); ``image_size`` must be a
    multiple of 16. Hidden list: the four stage outputs, then the 512-d feature.
    """

    _num_layers: int
    _name: str

    def __init__(self, num_classes: int, *, in_channels: int = 3, image_size: int | None = None,
                 pretrained: bool = False):
        super().__init__()
        _no_pretrained(self._name, pretrained)
        image_size = 64 if image_size is None else int(image_size)
        _check_size(self._name, image_size, 16)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.feature_dim = 512
        self.feature = IRBackbone(self._num_layers, in_channels)
        self.output_layer = _ir_output_layer(image_size // 16)
        self.fc_layer = nn.Linear(512, num_classes)

    @property
    def head(self) -> nn.Linear:
        return self.fc_layer

    def _trunk(self, x, hidden):
        # the last stage output is the input of the output layer; BiDO gets it through hidden too
        return self.output_layer(self.feature.forward_body(x, hidden))


class IR152(_FaceEvolve64):
    """IR-152 target (stage units 3/8/36/3) at 64x64, 512-d feature. Keys as KED-MI ``IR152``."""

    _num_layers, _name = 152, "ir152"


class FaceNet64(_FaceEvolve64):
    """IR-50 target (stage units 3/4/14/3) at 64x64, 512-d feature. Keys as KED-MI ``FaceNet64``."""

    _num_layers, _name = 50, "facenet64"


class FaceNetEval(Classifier):
    """Evaluation FaceNet (KED-MI ``FaceNet``): IR-50 at 112x112 with the output layer inside
    ``feature`` (Linear 512*7*7 -> 512), 512-d feature, ``fc_layer``.

    Inputs of any size are bilinearly resized to 112x112 inside (the official evaluation resizes
    64 -> 112 with kornia, bilinear, align_corners=False). Hidden list: four stage outputs, feature.
    """

    resize_to = 112

    def __init__(self, num_classes: int, *, in_channels: int = 3, image_size: int | None = None,
                 pretrained: bool = False):
        super().__init__()
        _no_pretrained("facenet_eval", pretrained)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, None  # any size
        self.feature_dim = 512
        self.feature = IRBackbone(50, in_channels, output_spatial=7)
        self.fc_layer = nn.Linear(512, num_classes)

    @property
    def head(self) -> nn.Linear:
        return self.fc_layer

    def _trunk(self, x, hidden):
        return self.feature.output_layer(self.feature.forward_body(x, hidden))


# ----------------------------------------------------------------------------------------------
# torchvision bodies: ResNet-18/34, Inception-v3
# ----------------------------------------------------------------------------------------------


class _TorchvisionResNet(Classifier):
    """torchvision ResNet body with torchvision key names (``conv1``, ``bn1``, ``layer1..4``, ``fc``).

    Feature: global-average-pooled 512-d output of ``layer4``. Takes any input size >= 32 (no resize).
    Hidden list: outputs of layer1..layer4, then the feature. ``in_channels != 3`` replaces ``conv1``
    (with pretrained weights, the RGB kernels are averaged into the new channel(s)).
    """

    _arch: str

    def __init__(self, num_classes: int, *, in_channels: int = 3, image_size: int | None = None,
                 pretrained: bool = False):
        super().__init__()
        import torchvision

        tv = getattr(torchvision.models, self._arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            tv.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(tv.conv1.weight, mode="fan_out", nonlinearity="relu")
        for name, mod in tv.named_children():  # same names and order as torchvision
            self.add_module(name, mod)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, None  # any size
        self.feature_dim = tv.fc.in_features
        if pretrained:
            weights = {"resnet18": torchvision.models.ResNet18_Weights,
                       "resnet34": torchvision.models.ResNet34_Weights}[self._arch].IMAGENET1K_V1
            _load_pretrained(self, _fetch_torchvision_weights(weights, self._arch), lambda k: k,
                             first_conv="conv1.weight", required=lambda k: not k.startswith("fc."))

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def _trunk(self, x, hidden):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            if hidden is not None:
                hidden.append(_flat(x))
        return torch.flatten(self.avgpool(x), 1)


class ResNet18(_TorchvisionResNet):
    """torchvision ResNet-18 classifier (CUB / ChestX-Ray targets in the paper)."""

    _arch = "resnet18"


class ResNet34(_TorchvisionResNet):
    """torchvision ResNet-34 classifier."""

    _arch = "resnet34"


class InceptionV3Eval(Classifier):
    """torchvision Inception-v3 (no auxiliary head) as an evaluation classifier (224 px setting).

    Inputs of any size are bilinearly resized to 299x299 inside; no ImageNet normalisation is applied
    (``transform_input`` off), also with ``pretrained=True`` (the ImageNet weights are a starting point
    for training on [0, 1] images). Feature: pooled 2048-d output of ``Mixed_7c`` (before dropout);
    logits = fc(dropout(feature)). Keys are torchvision's, without ``AuxLogits``. Hidden list: outputs
    of Mixed_5d, Mixed_6e, Mixed_7c, then the feature.
    """

    resize_to = 299
    _HIDDEN = ("Mixed_5d", "Mixed_6e", "Mixed_7c")

    def __init__(self, num_classes: int, *, in_channels: int = 3, image_size: int | None = None,
                 pretrained: bool = False):
        super().__init__()
        import torchvision

        tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                                             transform_input=False, num_classes=num_classes)
        if in_channels != 3:
            conv = tv.Conv2d_1a_3x3.conv
            tv.Conv2d_1a_3x3.conv = nn.Conv2d(in_channels, conv.out_channels, kernel_size=3, stride=2, bias=False)
            nn.init.trunc_normal_(tv.Conv2d_1a_3x3.conv.weight, std=0.1, a=-2, b=2)
        self._body_names: list[str] = []
        for name, mod in tv.named_children():
            self.add_module(name, mod)
            if name not in ("avgpool", "dropout", "fc"):
                self._body_names.append(name)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, None  # any size
        self.feature_dim = tv.fc.in_features
        if pretrained:
            weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
            _load_pretrained(self, _fetch_torchvision_weights(weights, "inception_v3_eval"),
                             lambda k: None if k.startswith("AuxLogits.") else k,
                             first_conv="Conv2d_1a_3x3.conv.weight", required=lambda k: not k.startswith("fc."))

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def logits_from_features(self, feats: Tensor) -> Tensor:
        return self.fc(self.dropout(feats))

    def _trunk(self, x, hidden):
        for name in self._body_names:
            x = getattr(self, name)(x)
            if hidden is not None and name in self._HIDDEN:
                hidden.append(_flat(x))
        return torch.flatten(self.avgpool(x), 1)


# ----------------------------------------------------------------------------------------------
# Small CPU-scale classifiers (28-32 px digits / small RGB)
# ----------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(Classifier):
    """Small target-style CNN for 28-32 px gray or RGB images (any size >= 8).

    Three stages [conv3x3 -> BN -> ReLU -> max-pool 2] with width, 2*width, 4*width channels, then
    adaptive average pooling to 2x2, dropout, Linear(16*width, feature_dim) -> BN1d -> ReLU = the
    feature (default feature_dim = 4*width), and a linear head. About 0.16 M parameters at width 32.
    Hidden list: the three stage outputs, then the feature.
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, image_size: int | None = None,
                 pretrained: bool = False, width: int = 32, feature_dim: int | None = None,
                 dropout: float = 0.25):
        super().__init__()
        _no_pretrained("small_cnn", pretrained)
        w = int(width)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, None  # any size
        self.feature_dim = 4 * w if feature_dim is None else int(feature_dim)
        self.stages = nn.ModuleList([
            nn.Sequential(*_conv_bn_relu(in_channels, w), nn.MaxPool2d(2)),
            nn.Sequential(*_conv_bn_relu(w, 2 * w), nn.MaxPool2d(2)),
            nn.Sequential(*_conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2)),
        ])
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(16 * w, self.feature_dim, bias=False),
                                   nn.BatchNorm1d(self.feature_dim), nn.ReLU(inplace=True))
        self.fc = nn.Linear(self.feature_dim, num_classes)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def _trunk(self, x, hidden):
        for stage in self.stages:
            x = stage(x)
            if hidden is not None:
                hidden.append(_flat(x))
        return self.embed(torch.flatten(self.pool(x), 1))


class BasicBlock(nn.Module):
    """Pre-activation-free ResNet basic block: conv-BN-ReLU-conv-BN + shortcut (1x1 conv+BN if needed), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x), inplace=True)


class SmallResNet(Classifier):
    """Small ResNet for 28-32 px images (any size >= 8), meant as the evaluation classifier at CPU scale.

    Stem conv3x3(width) -> BN -> ReLU, three stages of ``depth`` basic blocks with width, 2*width,
    4*width channels (strides 1, 2, 2), global average pooling -> feature (4*width-d), dropout, linear
    head. A different architecture from :class:`SmallCNN` on purpose (the evaluation classifier must
    not share the target's inductive biases). About 0.17 M parameters at width 16, depth 2.
    Hidden list: the three stage outputs, then the feature.
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, image_size: int | None = None,
                 pretrained: bool = False, width: int = 16, depth: int = 2, dropout: float = 0.1):
        super().__init__()
        _no_pretrained("small_resnet", pretrained)
        w, depth = int(width), int(depth)
        if depth < 1:
            raise ValueError(f"small_resnet: depth must be >= 1, got {depth}")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, None  # any size
        self.feature_dim = 4 * w
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, w))
        stages = []
        cin = w
        for i, cout in enumerate((w, 2 * w, 4 * w)):
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each residual branch (starts as identity)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def logits_from_features(self, feats: Tensor) -> Tensor:
        return self.fc(self.dropout(feats))

    def _trunk(self, x, hidden):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            if hidden is not None:
                hidden.append(_flat(x))
        return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

_MULT32 = tuple(range(32, 513, 32))
_MULT16 = tuple(range(16, 513, 16))


def _reg(name: str, cls, description: str, **meta) -> None:
    register(name, kind="classifier", description=description, data_kwargs=_DATA_KWARGS, **meta)(cls)


_reg("vgg16", VGG16, "VGG16-BN target (KED-MI layout), 2048-d feature at 64 px; image_size multiple of 32.",
     image_sizes=_MULT32, min_size=32)
_reg("ir152", IR152, "Face.evoLVe IR-152 target (KED-MI layout), 512-d feature; image_size multiple of 16.",
     image_sizes=_MULT16, min_size=16)
_reg("facenet64", FaceNet64, "Face.evoLVe IR-50 target (KED-MI FaceNet64), 512-d feature; image_size "
     "multiple of 16.", image_sizes=_MULT16, min_size=16)
_reg("facenet_eval", FaceNetEval, "Face.evoLVe IR-50 evaluation classifier at 112 px (inputs resized "
     "inside), 512-d feature.")
_reg("kedmi_vgg16", VGG16, "= vgg16 at the community checkpoint settings (64 px RGB, VGG16_88.26.tar).",
     image_sizes=(64,), min_size=64, channels=(3,))
_reg("kedmi_ir152", IR152, "= ir152 at the community checkpoint settings (64 px RGB, IR152_91.16.tar).",
     image_sizes=(64,), min_size=64, channels=(3,))
_reg("kedmi_facenet64", FaceNet64, "= facenet64 at the community checkpoint settings (64 px RGB, "
     "FaceNet64_88.50.tar).", image_sizes=(64,), min_size=64, channels=(3,))
_reg("kedmi_facenet_eval", FaceNetEval, "= facenet_eval at the community checkpoint settings (RGB, resized "
     "to 112, FaceNet_95.88.tar).", channels=(3,))
_reg("resnet18", ResNet18, "torchvision ResNet-18 (pooled 512-d feature); pretrained=True loads ImageNet "
     "weights.", min_size=32)
_reg("resnet34", ResNet34, "torchvision ResNet-34 (pooled 512-d feature); pretrained=True loads ImageNet "
     "weights.", min_size=32)
_reg("inception_v3_eval", InceptionV3Eval, "torchvision Inception-v3 without aux head, inputs resized to "
     "299 inside, 2048-d feature; evaluation classifier of the 224 px setting.")
_reg("small_cnn", SmallCNN, "CPU-scale target CNN for 28-32 px images (kw width, feature_dim, dropout).",
     min_size=8)
_reg("small_resnet", SmallResNet, "CPU-scale evaluation ResNet for 28-32 px images (kw width, depth, dropout).",
     min_size=8)

__all__ = ["Classifier", "VGG16", "IR152", "FaceNet64", "FaceNetEval", "IRBackbone", "IRUnit", "ResNet18",
           "ResNet34", "InceptionV3Eval", "SmallCNN", "SmallResNet", "BasicBlock"]
