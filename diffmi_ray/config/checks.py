"""Semantic checks of a grid that typed validation cannot express (names, sizes, class counts,
overlapping splits, missing folders). Each problem is (key path in the grid file, message).

A problem found in a grid point is reported at the axis entry that set the offending key
(``axes.diff_mi.attack.k[2]``) when an axis set it, else at its place in ``base``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffmi_ray.config.experiment import ExperimentConfig

if TYPE_CHECKING:  # pragma: no cover
    from diffmi_ray.config.loader import GridPoint, LoadedGrid


def _num_private_classes(cfg: ExperimentConfig) -> int | None:
    from diffmi_ray.data import get_info

    side = cfg.data.private
    if side.classes is not None:
        return len(side.classes)
    try:
        return get_info(side.dataset).num_classes
    except KeyError:
        return None


def check_point(cfg: ExperimentConfig, protocol) -> list[tuple[str, str]]:
    """Problems of one grid point; paths relative to the experiment (``data.private.root``) or, for
    protocol keys, prefixed with ``protocol.``."""
    from diffmi_ray import data as dreg
    from diffmi_ray import models as mreg

    probs: list[tuple[str, str]] = []
    size, ch = cfg.data.image_size, cfg.data.channels

    # Datasets: names, folders, classes.
    infos = {}
    for side_name in ("private", "public"):
        side = getattr(cfg.data, side_name)
        path = f"data.{side_name}"
        try:
            info = dreg.get_info(side.dataset)
        except KeyError:
            probs.append((f"{path}.dataset", f"unknown dataset {side.dataset!r}; valid: {dreg.names()}"))
            continue
        infos[side_name] = info
        for sub, msg in dreg.availability_problems(side):
            probs.append((f"{path}.{sub}", msg))
        if side.classes is not None:
            if len(set(side.classes)) != len(side.classes):
                probs.append((f"{path}.classes", "class ids must be distinct"))
            if info.num_classes is not None:
                bad = [c for c in side.classes if not 0 <= c < info.num_classes]
                if bad:
                    probs.append((f"{path}.classes", f"class ids {bad} out of range for '{info.name}' "
                                  f"(0..{info.num_classes - 1})"))
            elif side.classes:
                probs.append((f"{path}.classes", f"dataset '{info.name}' is unlabeled; it has no classes to select"))
    if "private" in infos:
        if infos["private"].num_classes is None:
            probs.append(("data.private.dataset", f"dataset '{infos['private'].name}' is unlabeled and cannot be "
                          "the private set (its classes are what the attack recovers)"))
    # Class-disjointness within one dataset family. Sides selected by a split file (KED-MI's CelebA
    # trainset/ganset lists) carry their own disjoint identities unless classes are given explicitly.
    by_file = any(getattr(cfg.data, s).split_file and getattr(cfg.data, s).classes is None
                  for s in ("private", "public"))
    if ("private" in infos and "public" in infos and infos["private"].family == infos["public"].family
            and not by_file):
        pc = set(cfg.data.private.classes if cfg.data.private.classes is not None
                 else range(infos["private"].num_classes or 0))
        uc = set(cfg.data.public.classes if cfg.data.public.classes is not None
                 else range(infos["public"].num_classes or 0))
        shared = sorted(pc & uc)
        if shared:
            probs.append(("data.public.classes", f"public and private splits share classes {shared[:10]}"
                          f"{' ...' if len(shared) > 10 else ''} of '{infos['private'].family}'; they must be "
                          "class-disjoint"))

    n_cls = _num_private_classes(cfg)

    # Classifiers.
    def check_model(path: str, name: str, kind: str, msize: int, mch: int):
        try:
            info = mreg.get_info(name)
        except KeyError:
            probs.append((path, f"unknown model {name!r}; valid: {mreg.names(kind)}"))
            return
        if info.kind != kind:
            probs.append((path, f"model {name!r} is a {info.kind}, not a {kind}; valid: {mreg.names(kind)}"))
            return
        err = info.size_error(msize, mch)
        if err:
            probs.append((path, err))

    check_model("target.model", cfg.target.model, "classifier", size, ch)
    check_model("protocol.eval.model", protocol.eval.model, "classifier", size, ch)
    if (protocol.eval.model == cfg.target.model and protocol.eval.model_kwargs == cfg.target.model_kwargs
            and protocol.eval.checkpoint == cfg.target.checkpoint):
        probs.append(("protocol.eval.model", f"the evaluation classifier must differ from the target "
                      f"({cfg.target.model!r}); the protocol forbids E == T"))

    # Checkpoint files named in the config must exist before anything runs.
    def check_file(path: str, value: str | None):
        import os

        if value and "://" not in value and not os.path.isfile(os.path.expanduser(value)):
            probs.append((path, f"checkpoint file not found: {value}"))

    check_file("target.checkpoint", cfg.target.checkpoint)
    check_file("protocol.eval.checkpoint", protocol.eval.checkpoint)
    mprior = cfg.method_config().prior
    if cfg.method == "diff_mi":
        check_file("diff_mi.prior.checkpoint", mprior.checkpoint)
    else:
        check_file(f"{cfg.method}.prior.train.generator_checkpoint", mprior.train.generator_checkpoint)
        check_file(f"{cfg.method}.prior.train.discriminator_checkpoint", mprior.train.discriminator_checkpoint)

    # Protocol vs classes.
    if n_cls is not None:
        if protocol.classes > n_cls:
            probs.append(("protocol.classes", f"attacks {protocol.classes} classes but the private set has {n_cls}"))
        if n_cls < 2:
            probs.append(("data.private.classes", "the private set needs at least 2 classes"))

    # Method-specific.
    m = cfg.method
    mc = cfg.method_config()
    if m == "diff_mi":
        u = mc.prior.unet
        usize, uch, what = size, ch, "image size"
        lat = mc.prior.latent
        if lat is not None:  # the U-Net works on the autoencoder's latents
            from diffmi_ray.models.autoencoder import latent_geometry

            geo = latent_geometry(lat, size)
            if geo is None:
                usize = None  # a Hub autoencoder: its geometry is known when the stage runs
            else:
                lsize, uch, f = geo
                ae_size = lat.image_size or size
                if ae_size % f:
                    probs.append(("diff_mi.prior.latent.image_size", f"{ae_size} px is not divisible by the "
                                  f"autoencoder's downsampling factor {f}"))
                usize, what = lsize, f"latent size ({ae_size} px / {f})"
        if usize is not None:
            check_model("diff_mi.prior.unet.model", u.model, "unet", usize, uch)
            levels = len(u.channel_mult)
            if usize % (2 ** (levels - 1)):
                probs.append(("diff_mi.prior.unet.channel_mult", f"{levels} levels halve the input {levels - 1} "
                              f"times; {what} {usize} is not divisible by {2 ** (levels - 1)}"))
            sizes = [usize // (2 ** i) for i in range(levels)]
            bad = [r for r in u.attention_resolutions if r not in sizes]
            if bad:
                probs.append(("diff_mi.prior.unet.attention_resolutions", f"{bad} are not feature-map sizes of "
                              f"this U-Net at {what} {usize}; valid: {sizes}"))
        if n_cls is not None:
            if mc.attack.loss == "topk_preg" and mc.attack.k >= n_cls:
                probs.append(("diff_mi.attack.k", f"k={mc.attack.k} must be < the number of classes ({n_cls})"))
            if mc.finetune.enabled and mc.finetune.loss_k >= n_cls:
                probs.append(("diff_mi.finetune.loss_k", f"k={mc.finetune.loss_k} must be < the number of "
                              f"classes ({n_cls})"))
            if mc.finetune.classes is not None and mc.finetune.classes > n_cls:
                probs.append(("diff_mi.finetune.classes", f"{mc.finetune.classes} > number of classes ({n_cls})"))
        if mc.attack.renoise_t >= mc.prior.diffusion.steps:
            probs.append(("diff_mi.attack.renoise_t", f"must be < diffusion steps ({mc.prior.diffusion.steps})"))
    else:
        arch = mc.prior.arch
        gan_size = size
        if arch.image_size is not None and arch.image_size != size:
            if mc.prior_kind != "gan_wgangp":
                probs.append((f"{m}.prior.arch.image_size", f"only the public-data GAN (GMI / VMI / PPA) can be "
                              f"trained at another size than the data's ({size} px); {m}'s prior uses the target"))
            else:
                gan_size = arch.image_size
        check_model(f"{m}.prior.arch.generator", arch.generator, "generator", gan_size, ch)
        check_model(f"{m}.prior.arch.discriminator", arch.discriminator, "discriminator", gan_size, ch)
    if mc.uses_pseudo_labels and n_cls is not None and cfg.pseudo_labels.top_n < 1:
        probs.append(("pseudo_labels.top_n", "must be >= 1"))
    if m == "ppa" and mc.attack.keep < protocol.images_per_class:
        probs.append(("ppa.attack.keep", f"keeps {mc.attack.keep} candidates but the protocol needs "
                      f"{protocol.images_per_class} images per class"))
    if m == "ppa" and mc.attack.keep > mc.attack.candidates:
        probs.append(("ppa.attack.keep", f"keeps {mc.attack.keep} of only {mc.attack.candidates} candidates"))
    return probs


def _locate(point: "GridPoint", path: str) -> str:
    if path.startswith("protocol."):
        return path
    best = None
    for key in point.locations:
        if path == key or path.startswith(key + ".") or key.startswith(path + "."):
            if best is None or len(key) > len(best):
                best = key
    if best is not None:
        rest = path[len(best):] if path.startswith(best) else ""
        return point.locations[best] + rest
    return f"base.{path}"


def check_grid(loaded: "LoadedGrid") -> list[tuple[str, str]]:
    """Problems of every grid point, located in the grid file."""
    probs: list[tuple[str, str]] = []
    for point in loaded.points:
        for path, msg in check_point(point.config, loaded.grid.protocol):
            probs.append((_locate(point, path), msg))
    return probs
