"""Pretrained weights the metric suite needs: where they are searched, how they are fetched, and the
one availability check that runs before any compute.

Files (official names; put them in ``EvaluationConfig.weights_dir`` or the torch hub cache
``<TORCH_HOME or ~/.cache/torch>/hub/checkpoints``):

========================================  ===========================  ====================================
file                                      used by                      source
========================================  ===========================  ====================================
pt_inception-2015-12-05-6726825d.pth      fid, prdc (Inception feats)  pytorch-fid release ``fid_weights``
alexnet-owt-7be5be79.pth                  lpips_alex (backbone)        torchvision AlexNet IMAGENET1K_V1
vgg16-397923af.pth                        lpips_vgg (backbone)         torchvision VGG16 IMAGENET1K_V1
========================================  ===========================  ====================================

The LPIPS linear heads ship inside the ``lpips`` package. A metric whose file cannot be found or
fetched is reported missing with the reason; it is never computed with random weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from diffmi_ray.config.evaluation import EvaluationConfig


@dataclass(frozen=True)
class WeightsFile:
    """One downloadable weights file.

    sha256_prefix: the hash prefix in the official file name, checked when the library that owns the
        file checks it too (torchvision does); None where the owner does not (pytorch-fid), in which
        case only a strict ``load_state_dict`` guards the file.
    """

    filename: str
    url: str
    sha256_prefix: str | None


INCEPTION_WEIGHTS = WeightsFile(
    "pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    None,
)
ALEXNET_WEIGHTS = WeightsFile(
    "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79")
VGG16_WEIGHTS = WeightsFile(
    "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", "397923af")

#: Feature extractor name -> the weights file it needs.
EXTRACTOR_WEIGHTS: dict[str, WeightsFile] = {
    "inception": INCEPTION_WEIGHTS,
    "lpips_alex": ALEXNET_WEIGHTS,
    "lpips_vgg": VGG16_WEIGHTS,
}


def needed_extractors(cfg: EvaluationConfig) -> list[str]:
    """Names of the pretrained extractors that ``cfg.metrics`` needs (subset of EXTRACTOR_WEIGHTS)."""
    m = set(cfg.metrics)
    need = []
    if "fid" in m or ("prdc" in m and cfg.prdc_features == "inception") or (
            "knn" in m and cfg.knn_features == "inception"):
        need.append("inception")
    need += [n for n in ("lpips_alex", "lpips_vgg") if n in m]
    return need


def hub_checkpoint_dir() -> Path:
    """The torch hub cache folder for weights files (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def search_dirs(cfg: EvaluationConfig) -> list[Path]:
    """Folders searched for weights files, in order: cfg.weights_dir, then the torch hub cache."""
    dirs = [Path(cfg.weights_dir).expanduser()] if cfg.weights_dir else []
    return dirs + [hub_checkpoint_dir()]


_HASH_OK: dict[tuple[str, int, int], bool] = {}


def _sha256_matches(path: Path, prefix: str) -> bool:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_OK:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_OK[key] = h.hexdigest().startswith(prefix)
    return _HASH_OK[key]


def how_to_provide(spec: WeightsFile, cfg: EvaluationConfig) -> str:
    """A sentence telling the user where to put ``spec``'s file."""
    where = " or ".join(str(d) for d in search_dirs(cfg))
    return (f"download {spec.url} on a machine with internet and copy {spec.filename} into {where} "
            f"(or set evaluation.weights_dir to its folder)")


def resolve_weights(spec: WeightsFile, cfg: EvaluationConfig,
                    log: Callable[[str], None] = print) -> tuple[Path | None, str | None]:
    """Find (or, if ``cfg.allow_download``, fetch into the hub cache) one weights file.

    Returns (path, None) when usable, else (None, reason). Never raises for a missing file.
    """
    problems = []
    for d in search_dirs(cfg):
        p = d / spec.filename
        if p.is_file():
            if cfg.verify_weights_hash and spec.sha256_prefix and not _sha256_matches(p, spec.sha256_prefix):
                problems.append(f"{p} does not match the SHA-256 prefix {spec.sha256_prefix} of its name")
                continue
            return p, None
    if not cfg.allow_download:
        reason = f"{spec.filename} not found in {[str(d) for d in search_dirs(cfg)]} and downloads are off"
    else:
        dst = hub_checkpoint_dir() / spec.filename
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            log(f"[metrics] downloading {spec.url} -> {dst}")
            torch.hub.download_url_to_file(spec.url, str(dst), hash_prefix=spec.sha256_prefix, progress=False)
            return dst, None
        except Exception as e:  # offline: URLError; bad hash: RuntimeError
            reason = f"{spec.filename} not found locally and its download failed ({type(e).__name__}: {e})"
    if problems:
        reason += "; " + "; ".join(problems)
    return None, reason


def resolve_extractors(cfg: EvaluationConfig, extractors: Mapping[str, object] | None = None,
                       names: Iterable[str] | None = None,
                       log: Callable[[str], None] = print) -> dict[str, tuple[Path | None, str | None]]:
    """name -> (weights path, reason) for each needed extractor; injected ones map to (None, None)."""
    extractors = extractors or {}
    out = {}
    for name in (needed_extractors(cfg) if names is None else list(names)):
        if name in extractors:
            out[name] = (None, None)
            continue
        spec = EXTRACTOR_WEIGHTS[name]
        path, reason = resolve_weights(spec, cfg, log=log)
        if reason is not None:
            log(f"[metrics] {name} unavailable: {reason}. To provide it: {how_to_provide(spec, cfg)}.")
        out[name] = (path, reason)
    return out


def available_feature_extractors(cfg: EvaluationConfig, extractors: Mapping[str, object] | None = None,
                                 log: Callable[[str], None] = print) -> dict[str, str | None]:
    """Which pretrained feature extractors ``cfg.metrics`` needs, and why any is unavailable.

    Returns name -> None (usable) or a reason string, for the names among 'inception', 'lpips_alex',
    'lpips_vgg' that the configured metrics need. Names present in ``extractors`` (injected
    stand-ins, tests only) count as available. Downloads into the hub cache when allowed.
    """
    return {n: r for n, (_, r) in resolve_extractors(cfg, extractors, log=log).items()}


def clear_hash_cache() -> None:
    """Forget remembered hash checks (tests)."""
    _HASH_OK.clear()


__all__ = ["WeightsFile", "INCEPTION_WEIGHTS", "ALEXNET_WEIGHTS", "VGG16_WEIGHTS", "EXTRACTOR_WEIGHTS",
           "needed_extractors", "hub_checkpoint_dir", "search_dirs", "resolve_weights", "resolve_extractors",
           "available_feature_extractors", "how_to_provide", "clear_hash_cache"]
