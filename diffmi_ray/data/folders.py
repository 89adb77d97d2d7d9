"""Real-folder datasets (CelebA, FFHQ, FaceScrub, CUB-200-2011, ChestX-ray14, CheXpert) with the
official preprocessing of the model-inversion literature (PROTOCOL.md section 1).

Each loader reads its file list once and decodes images lazily in ``image(i)`` with PIL. Images come
back as uint8 (H, W, C) after the dataset's official crop and are NOT resized: the common geometry
(size, channels) is applied later by :mod:`diffmi_ray.data.splits`. Faces and birds are RGB
(H, W, 3); X-rays are gray (H, W, 1).

Crops (facts from the official code of KED-MI, PLG-MI and Diff-MI; the fractions generalise them to
images of other sizes and reproduce the official pixel boxes at the official sizes):

=========== ================================================ =====================================
dataset     official crop                                    box at the official size (l, t, r, b)
=========== ================================================ =====================================
celeba      centre 108x108 of the aligned 178x218 image      (35, 55, 143, 163)
celeba_hd   none: PPA's HD CelebA Cropper output (face       -
            factor 0.65, 224 px) is already aligned
ffhq        centre 88x88 of the 128x128 thumbnail            (20, 20, 108, 108)
ffhq_hd     PPA: centre 800x800 of the 1024x1024 image       (112, 112, 912, 912)
facescrub   Diff-MI: image resized to 64x64, centre 54x54    (5, 5, 59, 59) of the 64x64 image;
            (PLG-MI uses the whole image; not offered here)  here: the same fraction of any size
cub200      the official bounding box (bounding_boxes.txt)   floor/ceil of x, y, x+w, y+h
chestxray   centre square (NIH images are 1024x1024: no-op)  -
chexpert    centre square of 'view1' frontal images          -
=========== ================================================ =====================================

``side.split_file`` (relative to ``root`` unless absolute) holds ``name [label]`` lines. It selects
the listed items, in the file's order, and when lines carry labels those become the labels
(KED-MI's CelebA ``trainset.txt`` / ``testset.txt``); without labels the dataset's own labels are
kept (KED-MI's ``ganset.txt``). Names are matched against the dataset's item keys (documented per
dataset below), or against the file's base name when that is unique in the dataset.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter

import numpy as np

from diffmi_ray.data.registry import DatasetInfo, Source, register
from diffmi_ray.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm")

CELEBA_IDENTITIES = 10177
CELEBA_CROP = 108  # of the aligned 178 x 218 (W x H) images
CELEBA_SIZE = (178, 218)
FFHQ_CROP, FFHQ_SIZE = 88, 128
FFHQ_HD_CROP, FFHQ_HD_SIZE = 800, 1024  # PPA's centre crop of 1024 px FFHQ faces (its StyleGAN2 outputs)
FACESCRUB_CROP, FACESCRUB_SIZE = 54, 64

# ChestX-ray14 findings in the order of the NIH release (Wang et al. 2017; also CheXNet's order):
# labels 0..13. "No Finding" is label 14, so a public side can take class 14 (the paper's 20,000
# "NoFinding" images) while the private side takes classes 0..13.
CHESTXRAY_CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
    "No Finding",
)
CHESTXRAY_NO_FINDING = 14
CHESTXRAY_CSVS = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
CHEXPERT_DIR = "CheXpert-v1.0-small"


# --------------------------------------------------------------------------------------------------
# The source


class FolderSource(Source):
    """Images in files, decoded on demand.

    paths: (N,) absolute file paths. labels: (N,) int64 (-1 = unlabeled).
    gray: decode to (H, W, 1) luma, else (H, W, 3) RGB.
    Crop, at most one of: ``frac`` = (fw, fh) centre crop of that fraction of width and height;
    ``boxes`` (N, 4) float x, y, w, h pixel boxes; ``square`` = centre crop to min(H, W).
    origin / lines: the listing file and 1-based line of each item, for error messages.
    class_names: names of the label ids where the dataset has them (FaceScrub people, ChestX-ray14).
    """

    class_names: list[str] | None = None

    def __init__(self, name: str, paths: list[str], labels, *, gray: bool,
                 frac: tuple[float, float] | None = None, boxes: np.ndarray | None = None,
                 square: bool = False, origin: str | None = None, lines: np.ndarray | None = None):
        self.name = name
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{name}: {len(self.paths)} paths but {len(self.labels)} labels")
        self.gray, self.frac, self.square = gray, frac, square
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.origin, self.lines = origin, lines

    def _where(self, i: int) -> str:
        if self.origin is None:
            return ""
        if self.lines is None:
            return f" (listed in {self.origin})"
        return f" (listed in {self.origin}, line {int(self.lines[i])})"

    def crop_box(self, i: int, width: int, height: int) -> tuple[int, int, int, int] | None:
        """The official crop of item ``i`` of a ``width`` x ``height`` image as (left, top, right,
        bottom) pixel bounds (right/bottom exclusive); None = whole image."""
        if self.boxes is not None:
            x, y, w, h = self.boxes[i]
            box = (max(0, math.floor(x)), max(0, math.floor(y)),
                   min(width, math.ceil(x + w)), min(height, math.ceil(y + h)))
            if box[2] <= box[0] or box[3] <= box[1]:
                raise UserError(f"{self.name}: bounding box {tuple(self.boxes[i])} of {self.paths[i]}"
                                f"{self._where(i)} lies outside the {width}x{height} image")
            return box
        if self.frac is not None:
            cw = min(width, max(1, int(round(width * self.frac[0]))))
            ch = min(height, max(1, int(round(height * self.frac[1]))))
        elif self.square:
            cw = ch = min(width, height)
        else:
            return None
        left, top = (width - cw) // 2, (height - ch) // 2
        return left, top, left + cw, top + ch

    def image(self, i: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im.load()
                arr = _pil_to_uint8(im, self.gray)
        except FileNotFoundError:
            raise UserError(f"{self.name}: image file not found: {path}{self._where(i)}") from None
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"{self.name}: cannot decode image {path}{self._where(i)}: {e}") from None
        box = self.crop_box(i, arr.shape[1], arr.shape[0])
        if box is not None:
            left, top, right, bottom = box
            arr = arr[top:bottom, left:right]
        return np.ascontiguousarray(arr)


def _pil_to_uint8(im, gray: bool) -> np.ndarray:
    """A PIL image as uint8 (H, W, 1) luma or (H, W, 3) RGB. 16-bit gray is scaled by 1/257."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    arr = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
    return arr[..., None] if gray else arr


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _root(side) -> str:
    root = getattr(side, "root", None)
    if not root:
        raise UserError("this dataset reads a folder: set data.<side>.root to it")
    if "://" in root:
        raise UserError(f"folder datasets read local folders only; mount or copy {root} to a local path")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise UserError(f"dataset folder not found: {root}")
    return root


def _split_path(side, root: str) -> str | None:
    sf = getattr(side, "split_file", None)
    if not sf:
        return None
    sf = os.path.expanduser(sf)
    return sf if os.path.isabs(sf) else os.path.join(root, sf)


def _read_split(path: str) -> list[tuple[str, int | None, int]]:
    """``name [label]`` lines of a split file as (name, label or None, line number). Blank lines and
    ``#`` comments are skipped; the label is the last whitespace-separated field when it is an
    integer; every line must agree on having a label or not."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read split file {path}: {e}") from None
    out: list[tuple[str, int | None, int]] = []
    first_kind: tuple[bool, int] | None = None
    for n, line in enumerate(raw, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.rsplit(None, 1)
        label = None
        if len(parts) == 2:
            try:
                label = int(parts[1])
            except ValueError:
                label = None
        name = parts[0] if label is not None else s
        if label is not None and label < 0:
            raise UserError(f"{path}:{n}: negative label {label} in {s!r}")
        kind = label is not None
        if first_kind is None:
            first_kind = (kind, n)
        elif kind != first_kind[0]:
            raise UserError(f"{path}:{n}: {'a' if kind else 'no'} label on this line, but line "
                            f"{first_kind[1]} has {'one' if first_kind[0] else 'none'}; a split file "
                            "is either all `filename label` lines or all `filename` lines")
        out.append((name, label, n))
    if not out:
        raise UserError(f"split file {path} lists no images")
    return out


def _norm_key(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _apply_split(dataset: str, keys: list[str], labels: np.ndarray, split: str,
                 root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Select (and relabel) items by a split file: (indices into keys, labels, split-file lines)."""
    entries = _read_split(split)
    index = {k: i for i, k in enumerate(keys)}
    base_count = Counter(os.path.basename(k) for k in keys)
    by_base = {os.path.basename(k): i for i, k in enumerate(keys) if base_count[os.path.basename(k)] == 1}
    seen: dict[int, int] = {}
    idx, labs, lines = [], [], []
    for name, label, n in entries:
        key = _norm_key(name)
        i = index.get(key)
        if i is None:
            i = by_base.get(os.path.basename(key))
        if i is None:
            hint = (" (its base name is ambiguous: give the path relative to the root)"
                    if base_count.get(os.path.basename(key), 0) > 1 else "")
            raise UserError(f"{split}:{n}: {name!r} is not an item of dataset '{dataset}' under {root}{hint}")
        if i in seen:
            raise UserError(f"{split}:{n}: {name!r} is listed twice (first on line {seen[i]})")
        seen[i] = n
        idx.append(i)
        labs.append(int(labels[i]) if label is None else label)
        lines.append(n)
    return np.asarray(idx, np.int64), np.asarray(labs, np.int64), np.asarray(lines, np.int64)


def _read_fields(path: str, what: str, ncols: int) -> list[tuple[list[str], int]]:
    """Whitespace-separated lines of ``path`` with exactly ``ncols`` fields, with line numbers."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None
    rows = []
    for n, line in enumerate(raw, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != ncols:
            raise UserError(f"{path}:{n}: expected {ncols} fields, got {len(parts)}: {line.strip()!r}")
        rows.append((parts, n))
    return rows


def _int(path: str, n: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{path}:{n}: {what} must be an integer, got {text!r}") from None


def _float(path: str, n: int, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{path}:{n}: {what} must be a number, got {text!r}") from None


def _walk_images(top: str) -> list[str]:
    """Image files under ``top`` (recursive, sorted, hidden entries skipped), as absolute paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS))
    return out


def _has_image(top: str) -> bool:
    for _dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") and f.lower().endswith(IMAGE_EXTS) for f in filenames):
            return True
    return False


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _checked(check):
    """Wrap a dataset check: skip remote roots (checked at load time) and check the split file."""

    def run(side) -> list[tuple[str, str]]:
        root = getattr(side, "root", None)
        if not root or "://" in root:
            return []
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            return []  # reported by registry.availability_problems
        probs = list(check(side, root))
        sp = _split_path(side, root)
        if sp is not None and not os.path.isfile(sp):
            probs.append(("split_file", f"split file not found: {sp}"))
        return probs

    run.__doc__ = check.__doc__
    return run


def _bad_csv(path: str, n: int, msg: str) -> UserError:
    return UserError(f"{path}:{n}: {msg}")


def _read_csv(path: str, what: str, required: tuple[str, ...]) -> tuple[list[dict], list[int]]:
    """Rows of a CSV with a header (column names stripped) and their 1-based line numbers."""
    try:
        f = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"{what} {path} is empty") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}:1: malformed CSV header: {e}") from None
        cols = [c.strip() for c in header]
        missing = [c for c in required if c not in cols]
        if missing:
            raise UserError(f"{path}:1: {what} lacks the column(s) {missing}; header: {cols}")
        pos = {c: cols.index(c) for c in required}
        rows, lines = [], []
        try:
            for row in reader:
                n = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) <= max(pos.values()):
                    raise _bad_csv(path, n, f"expected at least {max(pos.values()) + 1} columns, got {len(row)}")
                rows.append({c: row[p].strip() for c, p in pos.items()})
                lines.append(n)
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return rows, lines


# --------------------------------------------------------------------------------------------------
# CelebA

CELEBA_LAYOUT = ("<root>/img_align_celeba/*.jpg (aligned 178x218; or img_align_celeba_png/*.png) and "
                 "<root>/identity_CelebA.txt (`filename identity` lines), or a split_file of "
                 "`filename [label]` lines")


def _celeba_dir(root: str) -> tuple[str, bool]:
    """(images folder, png?) of a CelebA root."""
    jpg = os.path.join(root, "img_align_celeba")
    png = os.path.join(root, "img_align_celeba_png")
    if not os.path.isdir(jpg) and os.path.isdir(png):
        return png, True
    return jpg, False


def _check_celeba(side, root: str) -> list[tuple[str, str]]:
    """CelebA: the images folder, and the identity file unless a split file labels the images."""
    probs = []
    img_dir, _ = _celeba_dir(root)
    if not os.path.isdir(img_dir):
        probs.append(("root", f"CelebA images folder not found: {img_dir} (expected layout: {CELEBA_LAYOUT})"))
    ident = os.path.join(root, "identity_CelebA.txt")
    if not side.split_file and not os.path.isfile(ident):
        probs.append(("root", f"CelebA identity file not found: {ident} (it gives the labels; or set "
                              "split_file to a `filename label` list)"))
    return probs


def _celeba_identities(path: str) -> dict[str, tuple[int, int]]:
    """identity_CelebA.txt as {filename: (label = identity - 1, line)}."""
    out = {}
    for (name, ident), n in _read_fields(path, "CelebA identity file", 2):
        i = _int(path, n, ident, "the identity")
        if not 1 <= i <= CELEBA_IDENTITIES:
            raise UserError(f"{path}:{n}: identity {i} outside 1..{CELEBA_IDENTITIES}")
        out[name] = (i - 1, n)
    if not out:
        raise UserError(f"CelebA identity file {path} lists no images")
    return out


def load_celeba(side) -> FolderSource:
    """Aligned CelebA. Item key: the file name (``000001.jpg``). Labels: identity - 1 (0..10176) from
    identity_CelebA.txt, or the split file's labels. Crop: centre 108x108 of 178x218."""
    root = _root(side)
    img_dir, png = _celeba_dir(root)
    if not os.path.isdir(img_dir):
        raise UserError(f"CelebA images folder not found: {img_dir} (expected layout: {CELEBA_LAYOUT})")
    ident_path = os.path.join(root, "identity_CelebA.txt")
    split = _split_path(side, root)
    if split is not None:
        entries = _read_split(split)
        idents = None
        if entries[0][1] is None and os.path.isfile(ident_path):
            idents = _celeba_identities(ident_path)
        names, labels, lines = [], [], []
        seen: dict[str, int] = {}
        for name, label, n in entries:
            name = os.path.basename(_norm_key(name))
            if name in seen:
                raise UserError(f"{split}:{n}: {name!r} is listed twice (first on line {seen[name]})")
            seen[name] = n
            if label is None:
                if idents is not None:
                    if name not in idents:
                        raise UserError(f"{split}:{n}: {name!r} is not in {ident_path}")
                    label = idents[name][0]
                else:
                    label = -1
            names.append(name)
            labels.append(label)
            lines.append(n)
        origin = split
    else:
        idents = _celeba_identities(ident_path)
        names = list(idents)
        labels = [idents[k][0] for k in names]
        lines = [idents[k][1] for k in names]
        origin = ident_path
    files = [os.path.splitext(k)[0] + ".png" if png else k for k in names]
    present = set(os.listdir(img_dir))
    missing = [j for j, f in enumerate(files) if f not in present]
    if missing:
        j = missing[0]
        raise UserError(f"CelebA: {len(missing)} image(s) listed in {origin} are missing from {img_dir}; "
                        f"first: {files[j]} (line {lines[j]})")
    return FolderSource("celeba", [os.path.join(img_dir, f) for f in files], labels, gray=False,
                        frac=(CELEBA_CROP / CELEBA_SIZE[0], CELEBA_CROP / CELEBA_SIZE[1]),
                        origin=origin, lines=np.asarray(lines, np.int64))


# --------------------------------------------------------------------------------------------------
# CelebA HD (the high-resolution setting of PPA and the paper's Table VI)

CELEBA_HD_LAYOUT = ("<root>/images/* (faces cropped by the HD CelebA Cropper; file stems = the CelebA "
                    "file names, e.g. 000001.jpg or 000001.png) and <root>/identity_CelebA.txt")


def _check_celeba_hd(side, root: str) -> list[tuple[str, str]]:
    probs = []
    if not os.path.isdir(os.path.join(root, "images")):
        probs.append(("root", f"CelebA HD: images folder not found: {os.path.join(root, 'images')} "
                              f"(expected layout: {CELEBA_HD_LAYOUT})"))
    if not os.path.isfile(os.path.join(root, "identity_CelebA.txt")):
        probs.append(("root", f"CelebA HD: identity file not found: {os.path.join(root, 'identity_CelebA.txt')}"))
    return probs


def load_celeba_hd(side) -> FolderSource:
    """CelebA faces pre-cropped by the HD CelebA Cropper (PPA: face factor 0.65, bicubic to 224 px).

    Item key: the file name in ``images/``. Images are matched to identity_CelebA.txt by file stem
    (the cropper may change the extension); listed images the cropper dropped are skipped. Labels:
    identities ranked by their number of images present, most first (ties: lower identity id first),
    so ``classes: [0, ..., 999]`` are the 1000 most frequent identities (PPA's and the paper's
    selection). No crop. A split file selects / relabels items by file name as for the other datasets.
    """
    root = _root(side)
    img_dir = os.path.join(root, "images")
    if not os.path.isdir(img_dir):
        raise UserError(f"CelebA HD: images folder not found: {img_dir} (expected layout: {CELEBA_HD_LAYOUT})")
    ident_path = os.path.join(root, "identity_CelebA.txt")
    idents = _celeba_identities(ident_path)
    present = {os.path.splitext(f)[0]: f for f in os.listdir(img_dir)
               if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)}
    items = [(present[os.path.splitext(name)[0]], ident, line) for name, (ident, line) in idents.items()
             if os.path.splitext(name)[0] in present]
    if not items:
        raise UserError(f"CelebA HD: none of the images in {ident_path} is in {img_dir}")
    counts = Counter(ident for _, ident, _ in items)
    rank = {ident: r for r, ident in enumerate(sorted(counts, key=lambda i: (-counts[i], i)))}
    names = [f for f, _, _ in items]
    labels = np.asarray([rank[i] for _, i, _ in items], np.int64)
    lines = np.asarray([n for _, _, n in items], np.int64)
    origin = ident_path
    split = _split_path(side, root)
    if split is not None:
        idx, labels, lines = _apply_split("celeba_hd", names, labels, split, root)
        names, origin = [names[i] for i in idx], split
    return FolderSource("celeba_hd", [os.path.join(img_dir, f) for f in names], labels, gray=False,
                        origin=origin, lines=lines)


# --------------------------------------------------------------------------------------------------
# FFHQ

def _check_ffhq(side, root: str) -> list[tuple[str, str]]:
    """FFHQ: at least one image file under the root."""
    if not _has_image(root):
        return [("root", f"FFHQ: no images (png/jpg) found under {root} (expected layout: <root>/**/*.png, "
                         "e.g. the 128x128 thumbnails)")]
    return []


def load_ffhq(side) -> FolderSource:
    """FFHQ images under root (recursive, sorted). Item key: path relative to root. Unlabeled (-1)
    unless a split file gives labels. Crop: centre 88/128 of each side (88x88 of the thumbnails)."""
    root = _root(side)
    paths = _walk_images(root)
    if not paths:
        raise UserError(f"FFHQ: no images (png/jpg) found under {root}")
    labels = np.full(len(paths), -1, np.int64)
    lines, origin = None, None
    split = _split_path(side, root)
    if split is not None:
        idx, labels, lines = _apply_split("ffhq", [_rel(p, root) for p in paths], labels, split, root)
        paths, origin = [paths[i] for i in idx], split
    f = FFHQ_CROP / FFHQ_SIZE
    return FolderSource("ffhq", paths, labels, gray=False, frac=(f, f), origin=origin, lines=lines)


def load_ffhq_hd(side) -> FolderSource:
    """FFHQ at full resolution (the 1024x1024 images, or any square size) for the high-resolution
    setting: PPA's centre crop 800/1024 of each side. Otherwise as :func:`load_ffhq`."""
    src = load_ffhq(side)
    f = FFHQ_HD_CROP / FFHQ_HD_SIZE
    return FolderSource("ffhq_hd", src.paths, src.labels, gray=False, frac=(f, f), origin=src.origin,
                        lines=src.lines)


# --------------------------------------------------------------------------------------------------
# FaceScrub

FACESCRUB_LAYOUT = ("<root>/<person>/*.jpg, or <root>/actors/faces/<person>/* and "
                    "<root>/actresses/faces/<person>/* (the 'faces' level is optional)")


def _facescrub_people(root: str) -> list[tuple[str, str]]:
    """(person, folder) pairs of a FaceScrub root, in folder order."""
    groups = [g for g in ("actors", "actresses") if os.path.isdir(os.path.join(root, g))]
    if groups:
        parents = []
        for g in groups:
            faces = os.path.join(root, g, "faces")
            parents.append(faces if os.path.isdir(faces) else os.path.join(root, g))
    else:
        parents = [root]
    out = []
    for p in parents:
        for e in sorted(os.scandir(p), key=lambda e: e.name):
            if e.is_dir() and not e.name.startswith("."):
                out.append((e.name, e.path))
    return out


def _check_facescrub(side, root: str) -> list[tuple[str, str]]:
    """FaceScrub: at least one person folder."""
    if not _facescrub_people(root):
        return [("root", f"FaceScrub: no person folders found under {root} (expected layout: {FACESCRUB_LAYOUT})")]
    return []


def load_facescrub(side) -> FolderSource:
    """FaceScrub, one folder per person (actors and actresses merged). Labels: index of the person
    name in the sorted list of people with images. Item key: path relative to root. Crop: Diff-MI's
    centre 54/64 of each side."""
    root = _root(side)
    people = _facescrub_people(root)
    per_person: dict[str, list[str]] = {}
    for person, folder in people:
        per_person.setdefault(person, []).extend(_walk_images(folder))
    names = sorted(p for p, files in per_person.items() if files)
    if not names:
        raise UserError(f"FaceScrub: no images found under {root} (expected layout: {FACESCRUB_LAYOUT})")
    paths, labels = [], []
    for c, person in enumerate(names):
        paths.extend(per_person[person])
        labels.extend([c] * len(per_person[person]))
    labels = np.asarray(labels, np.int64)
    lines, origin = None, None
    split = _split_path(side, root)
    if split is not None:
        idx, labels, lines = _apply_split("facescrub", [_rel(p, root) for p in paths], labels, split, root)
        paths, origin = [paths[i] for i in idx], split
    src = FolderSource("facescrub", paths, labels, gray=False,
                       frac=(FACESCRUB_CROP / FACESCRUB_SIZE, FACESCRUB_CROP / FACESCRUB_SIZE),
                       origin=origin, lines=lines)
    src.class_names = names
    return src


# --------------------------------------------------------------------------------------------------
# CUB-200-2011

CUB_FILES = ("images.txt", "image_class_labels.txt", "bounding_boxes.txt")
CUB_LAYOUT = ("<root>/images.txt, <root>/image_class_labels.txt, <root>/bounding_boxes.txt and "
              "<root>/images/<class folder>/*.jpg (the CUB_200_2011 folder; its parent also works)")


def _cub_root(root: str) -> str:
    inner = os.path.join(root, "CUB_200_2011")
    if not os.path.isfile(os.path.join(root, "images.txt")) and os.path.isfile(os.path.join(inner, "images.txt")):
        return inner
    return root


def _check_cub(side, root: str) -> list[tuple[str, str]]:
    """CUB-200-2011: the three list files and the images folder."""
    r = _cub_root(root)
    probs = [("root", f"CUB-200-2011 file not found: {os.path.join(r, f)} (expected layout: {CUB_LAYOUT})")
             for f in CUB_FILES if not os.path.isfile(os.path.join(r, f))]
    if not os.path.isdir(os.path.join(r, "images")):
        probs.append(("root", f"CUB-200-2011 images folder not found: {os.path.join(r, 'images')} "
                              f"(expected layout: {CUB_LAYOUT})"))
    return probs


def load_cub200(side) -> FolderSource:
    """CUB-200-2011 in images.txt order. Item key: the images.txt path (``001.Black_footed_Albatross/
    ....jpg``). Labels: class id - 1 (0..199). Crop: the official bounding box."""
    root = _cub_root(_root(side))
    paths_f, labels_f, boxes_f = (os.path.join(root, f) for f in CUB_FILES)
    images = _read_fields(paths_f, "CUB-200-2011 image list", 2)
    cls = {}
    for (iid, c), n in _read_fields(labels_f, "CUB-200-2011 class list", 2):
        c = _int(labels_f, n, c, "the class id")
        if not 1 <= c <= 200:
            raise UserError(f"{labels_f}:{n}: class id {c} outside 1..200")
        cls[iid] = c - 1
    boxes = {}
    for (iid, x, y, w, h), n in _read_fields(boxes_f, "CUB-200-2011 bounding boxes", 5):
        b = tuple(_float(boxes_f, n, v, k) for v, k in zip((x, y, w, h), ("x", "y", "width", "height")))
        if b[2] <= 0 or b[3] <= 0:
            raise UserError(f"{boxes_f}:{n}: bounding box width and height must be positive, got {b[2]} x {b[3]}")
        boxes[iid] = b
    keys, labels, bxs, lines = [], [], [], []
    for (iid, rel), n in images:
        if iid not in cls:
            raise UserError(f"{paths_f}:{n}: image id {iid} has no class in {labels_f}")
        if iid not in boxes:
            raise UserError(f"{paths_f}:{n}: image id {iid} has no bounding box in {boxes_f}")
        keys.append(_norm_key(rel))
        labels.append(cls[iid])
        bxs.append(boxes[iid])
        lines.append(n)
    if not keys:
        raise UserError(f"CUB-200-2011 image list {paths_f} lists no images")
    labels = np.asarray(labels, np.int64)
    lines = np.asarray(lines, np.int64)
    bxs = np.asarray(bxs, np.float64)
    origin = paths_f
    split = _split_path(side, root)
    if split is not None:
        idx, labels, lines = _apply_split("cub200", keys, labels, split, root)
        keys, bxs, origin = [keys[i] for i in idx], bxs[idx], split
    img_dir = os.path.join(root, "images")
    paths = [os.path.join(img_dir, k) for k in keys]
    missing = [j for j, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        j = missing[0]
        raise UserError(f"CUB-200-2011: {len(missing)} image(s) listed in {origin} are missing; first: "
                        f"{paths[j]} (line {lines[j]})")
    return FolderSource("cub200", paths, labels, gray=False, boxes=bxs, origin=origin, lines=lines)


# --------------------------------------------------------------------------------------------------
# NIH ChestX-ray14

CHESTXRAY_LAYOUT = ("<root>/Data_Entry_2017.csv (columns `Image Index`, `Finding Labels`) and the PNGs in "
                    "<root>/images/ or <root>/images_*/images/")


def _chestxray_csv(root: str) -> str:
    for name in CHESTXRAY_CSVS:
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    return os.path.join(root, CHESTXRAY_CSVS[0])


def _chestxray_dirs(root: str) -> list[str]:
    dirs = []
    if os.path.isdir(os.path.join(root, "images")):
        dirs.append(os.path.join(root, "images"))
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.is_dir() and e.name.startswith("images_") and os.path.isdir(os.path.join(e.path, "images")):
            dirs.append(os.path.join(e.path, "images"))
    return dirs


def _check_chestxray(side, root: str) -> list[tuple[str, str]]:
    """ChestX-ray14: the data-entry CSV and an images folder."""
    probs = []
    if not os.path.isfile(_chestxray_csv(root)):
        probs.append(("root", f"ChestX-ray14 label file not found: {os.path.join(root, CHESTXRAY_CSVS[0])} "
                              f"(expected layout: {CHESTXRAY_LAYOUT})"))
    if not _chestxray_dirs(root):
        probs.append(("root", f"ChestX-ray14 images folder not found: {os.path.join(root, 'images')} or "
                              f"{os.path.join(root, 'images_*', 'images')} (expected layout: {CHESTXRAY_LAYOUT})"))
    return probs


def load_chestxray(side) -> FolderSource:
    """NIH ChestX-ray14, single-label images only (multi-label rows are dropped), CSV order. Item
    key: the `Image Index` file name. Labels: index in CHESTXRAY_CLASSES (0..13 findings,
    14 = No Finding). Gray; centre square crop."""
    root = _root(side)
    csv_path = _chestxray_csv(root)
    rows, row_lines = _read_csv(csv_path, "ChestX-ray14 label file", ("Image Index", "Finding Labels"))
    class_index = {c: i for i, c in enumerate(CHESTXRAY_CLASSES)}
    keys, labels, lines = [], [], []
    for row, n in zip(rows, row_lines):
        findings = [s.strip() for s in row["Finding Labels"].split("|") if s.strip()]
        for s in findings:
            if s not in class_index:
                raise UserError(f"{csv_path}:{n}: unknown finding {s!r}; known: {list(CHESTXRAY_CLASSES)}")
        if len(findings) != 1:
            continue
        if not row["Image Index"]:
            raise UserError(f"{csv_path}:{n}: empty `Image Index`")
        keys.append(row["Image Index"])
        labels.append(class_index[findings[0]])
        lines.append(n)
    labels, lines, origin = np.asarray(labels, np.int64), np.asarray(lines, np.int64), csv_path
    split = _split_path(side, root)
    if split is not None:
        idx, labels, lines = _apply_split("chestxray", keys, labels, split, root)
        keys, origin = [keys[i] for i in idx], split
    dirs = _chestxray_dirs(root)
    if not dirs:
        raise UserError(f"ChestX-ray14 images folder not found under {root} (expected layout: {CHESTXRAY_LAYOUT})")
    where: dict[str, str] = {}
    for d in dirs:
        for e in os.scandir(d):
            where.setdefault(e.name, d)
    missing = [j for j, k in enumerate(keys) if k not in where]
    if missing:
        j = missing[0]
        raise UserError(f"ChestX-ray14: {len(missing)} image(s) listed in {origin} are missing from "
                        f"{', '.join(dirs)}; first: {keys[j]} (line {lines[j]}); a split_file can restrict "
                        "the set to the images you have")
    paths = [os.path.join(where[k], k) for k in keys]
    src = FolderSource("chestxray", paths, labels, gray=True, square=True, origin=origin, lines=lines)
    src.class_names = list(CHESTXRAY_CLASSES)
    return src


# --------------------------------------------------------------------------------------------------
# CheXpert

CHEXPERT_LAYOUT = (f"<root>/train.csv (columns `Path`, `Frontal/Lateral`) with `Path` relative to the parent "
                   f"of {CHEXPERT_DIR} or to root (root = the {CHEXPERT_DIR} folder or its parent)")


def _chexpert_csv(root: str) -> str:
    p = os.path.join(root, "train.csv")
    inner = os.path.join(root, CHEXPERT_DIR, "train.csv")
    return inner if not os.path.isfile(p) and os.path.isfile(inner) else p


def _check_chexpert(side, root: str) -> list[tuple[str, str]]:
    """CheXpert: train.csv."""
    p = _chexpert_csv(root)
    if not os.path.isfile(p):
        return [("root", f"CheXpert label file not found: {p} (expected layout: {CHEXPERT_LAYOUT})")]
    return []


def _chexpert_resolver(csv_path: str, first: str):
    """How CSV paths map to files: relative to the CSV's folder, its parent, or the CSV's folder with
    the leading component (``CheXpert-v1.0-small/``) dropped; decided on the first row."""
    base = os.path.dirname(csv_path)
    cands = [lambda p: os.path.join(base, p), lambda p: os.path.join(os.path.dirname(base), p),
             lambda p: os.path.join(base, p.split("/", 1)[1] if "/" in p else p)]
    for c in cands:
        if os.path.isfile(c(first)):
            return c
    tried = ", ".join(dict.fromkeys(c(first) for c in cands))
    raise UserError(f"CheXpert: cannot find the first image of {csv_path} ({first!r}); tried {tried} "
                    f"(expected layout: {CHEXPERT_LAYOUT})")


def _load_chexpert(side, square_only: bool) -> FolderSource:
    name = "chexpert_square" if square_only else "chexpert"
    root = _root(side)
    csv_path = _chexpert_csv(root)
    rows, row_lines = _read_csv(csv_path, "CheXpert label file", ("Path", "Frontal/Lateral"))
    keys, lines = [], []
    for row, n in zip(rows, row_lines):
        p = _norm_key(row["Path"])
        if row["Frontal/Lateral"] == "Frontal" and os.path.basename(p).startswith("view1"):
            keys.append(p)
            lines.append(n)
    if not keys:
        raise UserError(f"CheXpert: {csv_path} has no 'view1' frontal images")
    labels, lines, origin = np.full(len(keys), -1, np.int64), np.asarray(lines, np.int64), csv_path
    split = _split_path(side, root)
    if split is not None:
        idx, labels, lines = _apply_split(name, keys, labels, split, root)
        keys, origin = [keys[i] for i in idx], split
    resolve = _chexpert_resolver(csv_path, keys[0])
    paths = [resolve(k) for k in keys]
    if square_only:
        from PIL import Image

        keep = []
        for j, p in enumerate(paths):
            try:
                with Image.open(p) as im:  # reads the header only
                    w, h = im.size
            except FileNotFoundError:
                raise UserError(f"CheXpert: image file not found: {p} (listed in {origin}, line {lines[j]})") from None
            except OSError as e:
                raise UserError(f"CheXpert: cannot read {p} (listed in {origin}, line {lines[j]}): {e}") from None
            if w == h:
                keep.append(j)
        keep = np.asarray(keep, np.int64)
        paths, labels, lines = [paths[j] for j in keep], labels[keep], lines[keep]
        if not paths:
            raise UserError(f"CheXpert: no square 'view1' frontal images in {origin}")
    return FolderSource(name, paths, labels, gray=True, square=True, origin=origin, lines=lines)


def load_chexpert(side) -> FolderSource:
    """CheXpert 'view1' frontal images of train.csv, in CSV order, centre-cropped to squares.
    Item key: the CSV `Path`. Unlabeled (-1): public data for the ChestX-ray attacks."""
    return _load_chexpert(side, square_only=False)


def load_chexpert_square(side) -> FolderSource:
    """The paper's CheXpert selection: only 'view1' frontal images whose height equals their width
    (12,940 in the paper). Reads every candidate's image header once at load time."""
    return _load_chexpert(side, square_only=True)


# --------------------------------------------------------------------------------------------------
# Registration

register(DatasetInfo(
    "celeba", CELEBA_IDENTITIES, 3, CELEBA_CROP, "celeba", True, load_celeba,
    "CelebA aligned faces (10,177 identities; labels = identity - 1 or a KED-MI split file's labels); "
    "official centre crop 108x108 of 178x218",
    check=_checked(_check_celeba),
    extra={"layout": CELEBA_LAYOUT, "crop": "centre 108x108 of 178x218 (box 35,55,143,163)"}))
register(DatasetInfo(
    "ffhq", None, 3, FFHQ_CROP, "ffhq", True, load_ffhq,
    "FFHQ faces, unlabeled (public data only); official centre crop 88 of the 128x128 thumbnails",
    check=_checked(_check_ffhq),
    extra={"layout": "<root>/**/*.png|jpg (recursive)", "crop": "centre 88/128 of each side"}))
register(DatasetInfo(
    "celeba_hd", CELEBA_IDENTITIES, 3, 224, "celeba_hd", True, load_celeba_hd,
    "CelebA faces cropped by the HD CelebA Cropper (PPA / Table VI: face factor 0.65, 224 px); labels = "
    "identities ranked by image count (0 = most frequent), so classes 0..999 are the 1000 most frequent",
    check=_checked(_check_celeba_hd),
    extra={"layout": CELEBA_HD_LAYOUT, "crop": "none (pre-aligned)"}))
register(DatasetInfo(
    "ffhq_hd", None, 3, FFHQ_HD_CROP, "ffhq", True, load_ffhq_hd,
    "FFHQ at full resolution, unlabeled (public data only); PPA's centre crop 800/1024 of each side",
    check=_checked(_check_ffhq),
    extra={"layout": "<root>/**/*.png|jpg (recursive), e.g. <ffhq>/images1024x1024",
           "crop": "centre 800/1024 of each side (PPA)"}))
register(DatasetInfo(
    "facescrub", 530, 3, FACESCRUB_CROP, "facescrub", True, load_facescrub,
    "FaceScrub (530 people nominal, 526 in the cleaned set; labels = sorted person folders); "
    "Diff-MI's centre crop 54/64",
    check=_checked(_check_facescrub),
    extra={"layout": FACESCRUB_LAYOUT, "crop": "centre 54/64 of each side (Diff-MI)"}))
register(DatasetInfo(
    "cub200", 200, 3, 224, "cub200", True, load_cub200,
    "CUB-200-2011 birds (200 classes, labels = class id - 1), cropped to the official bounding boxes "
    "(sizes vary)",
    check=_checked(_check_cub),
    extra={"layout": CUB_LAYOUT, "crop": "official bounding box"}))
register(DatasetInfo(
    "chestxray", len(CHESTXRAY_CLASSES), 1, 1024, "chestxray", True, load_chestxray,
    "NIH ChestX-ray14, single-label images; classes 0..13 = the 14 findings, 14 = No Finding "
    "(private: classes 0..13; public: class 14)",
    check=_checked(_check_chestxray),
    extra={"layout": CHESTXRAY_LAYOUT, "crop": "centre square", "class_names": list(CHESTXRAY_CLASSES)}))
register(DatasetInfo(
    "chexpert", None, 1, 320, "chexpert", True, load_chexpert,
    "CheXpert 'view1' frontal chest X-rays, unlabeled (public data), centre-cropped to squares",
    check=_checked(_check_chexpert),
    extra={"layout": CHEXPERT_LAYOUT, "crop": "centre square"}))
register(DatasetInfo(
    "chexpert_square", None, 1, 320, "chexpert", True, load_chexpert_square,
    "CheXpert 'view1' frontal X-rays that are natively square (the paper's 12,940), unlabeled",
    check=_checked(_check_chexpert),
    extra={"layout": CHEXPERT_LAYOUT, "crop": "none (square images only)"}))
