"""Real-folder datasets on tiny fake folders built with PIL: layouts, labels, official crops,
split files, error messages and availability checks."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from diffmi_ray.config.data import DataConfig, DataSide
from diffmi_ray.data import availability_problems, get_info, names
from diffmi_ray.data import folders
from diffmi_ray.data.splits import make_split, materialize
from diffmi_ray.errors import UserError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _save(path, size, box=None, fill=BLUE, inner=RED, mode="RGB", fmt=None, **kw):
    """An image of ``size`` (W, H) filled with ``fill``, with ``box`` (l, t, r, b) painted ``inner``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = fill
    if box is not None:
        l, t, r, b = box
        a[t:b, l:r] = inner
    im = Image.fromarray(a, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt, **kw)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def side(dataset, root, **kw):
    return DataSide(dataset=dataset, root=str(root), **kw)


def test_registered():
    for n in ("celeba", "celeba_hd", "ffhq", "ffhq_hd", "facescrub", "cub200", "chestxray", "chexpert",
              "chexpert_square"):
        assert n in names()
        assert get_info(n).needs_root and get_info(n).check is not None
    assert get_info("celeba").num_classes == 10177 and get_info("celeba").family == "celeba"
    assert get_info("ffhq").num_classes is None
    assert get_info("facescrub").num_classes == 530
    assert get_info("cub200").num_classes == 200
    assert get_info("chestxray").num_classes == 15 and get_info("chestxray").channels == 1
    assert folders.CHESTXRAY_CLASSES[14] == "No Finding"
    assert get_info("chexpert").num_classes is None and get_info("chexpert").family == "chexpert"


# ---------------------------------------------------------------------------------------------- CelebA

CELEBA_BOX = (35, 55, 143, 163)  # official: ((178-108)//2, (218-108)//2) + 108


def make_celeba(root, n=6, ids=(5, 5, 9, 9, 1, 1), png=False):
    d = root / ("img_align_celeba_png" if png else "img_align_celeba")
    lines = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        fname = f"{i + 1:06d}.png" if png else name
        _save(str(d / fname), (178, 218), CELEBA_BOX, **({} if png else {"quality": 95}))
        lines.append(f"{name} {ids[i]}")
    _write(str(root / "identity_CelebA.txt"), "\n".join(lines) + "\n")
    return root


def test_celeba_identity_labels_and_crop(tmp_path):
    make_celeba(tmp_path)
    src = folders.load_celeba(side("celeba", tmp_path))
    assert len(src) == 6
    assert src.labels.tolist() == [4, 4, 8, 8, 0, 0]  # identity - 1
    im = src.image(0)
    assert im.dtype == np.uint8 and im.shape == (108, 108, 3)
    assert np.abs(im.astype(int) - RED).mean() < 6  # only the red centre box survives (JPEG)
    assert src.crop_box(0, 178, 218) == CELEBA_BOX


def test_celeba_png_variant_exact_box(tmp_path):
    make_celeba(tmp_path, png=True)
    src = folders.load_celeba(side("celeba", tmp_path))
    im = src.image(2)
    assert im.shape == (108, 108, 3) and (im == RED).all()


def test_celeba_proportional_crop_for_other_sizes(tmp_path):
    src = folders.FolderSource("x", ["a"], [0], gray=False, frac=(108 / 178, 108 / 218))
    assert src.crop_box(0, 356, 436) == (70, 110, 286, 326)  # the official box scaled by 2


def test_celeba_split_file_with_labels(tmp_path):
    make_celeba(tmp_path)
    _write(str(tmp_path / "splits" / "trainset.txt"), "000003.jpg 0\n000001.jpg 1\n\n000006.jpg 1\n")
    src = folders.load_celeba(side("celeba", tmp_path, split_file="splits/trainset.txt"))
    assert [os.path.basename(p) for p in src.paths] == ["000003.jpg", "000001.jpg", "000006.jpg"]
    assert src.labels.tolist() == [0, 1, 1]  # the split file's labels, in its order
    # absolute path, names only -> identity labels
    _write(str(tmp_path / "gan.txt"), "000002.jpg\n000005.jpg\n")
    src = folders.load_celeba(side("celeba", tmp_path, split_file=str(tmp_path / "gan.txt")))
    assert src.labels.tolist() == [4, 0]


def test_celeba_split_file_without_identity_file_is_unlabeled(tmp_path):
    make_celeba(tmp_path)
    os.remove(tmp_path / "identity_CelebA.txt")
    _write(str(tmp_path / "gan.txt"), "000002.jpg\n000004.jpg\n")
    s = side("celeba", tmp_path, split_file="gan.txt")
    assert availability_problems(s) == []
    src = folders.load_celeba(s)
    assert src.labels.tolist() == [-1, -1]


def test_celeba_errors_name_file_and_line(tmp_path):
    make_celeba(tmp_path)
    with open(tmp_path / "identity_CelebA.txt", "a") as f:
        f.write("000099.jpg 3\n")
    with pytest.raises(UserError, match=r"1 image\(s\) listed in .*identity_CelebA.txt.*000099.jpg \(line 7\)"):
        folders.load_celeba(side("celeba", tmp_path))
    _write(str(tmp_path / "identity_CelebA.txt"), "000001.jpg 5\n000002.jpg five\n")
    with pytest.raises(UserError, match=r"identity_CelebA.txt:2: the identity must be an integer"):
        folders.load_celeba(side("celeba", tmp_path))
    _write(str(tmp_path / "identity_CelebA.txt"), "000001.jpg 5 extra\n")
    with pytest.raises(UserError, match=r"identity_CelebA.txt:1: expected 2 fields"):
        folders.load_celeba(side("celeba", tmp_path))
    _write(str(tmp_path / "mixed.txt"), "000001.jpg 0\n000002.jpg\n")
    with pytest.raises(UserError, match=r"mixed.txt:2: no label"):
        folders.load_celeba(side("celeba", tmp_path, split_file="mixed.txt"))
    _write(str(tmp_path / "dup.txt"), "000001.jpg 0\n000001.jpg 0\n")
    with pytest.raises(UserError, match=r"dup.txt:2: .*listed twice \(first on line 1\)"):
        folders.load_celeba(side("celeba", tmp_path, split_file="dup.txt"))


def test_celeba_availability(tmp_path):
    assert availability_problems(side("celeba", tmp_path / "nope")) == [
        ("root", f"dataset folder not found: {tmp_path / 'nope'}")]
    probs = availability_problems(side("celeba", tmp_path))
    keys = [k for k, _ in probs]
    assert keys == ["root", "root"]
    assert probs[0][1].startswith(f"CelebA images folder not found: {tmp_path / 'img_align_celeba'}")
    assert probs[1][1].startswith(f"CelebA identity file not found: {tmp_path / 'identity_CelebA.txt'}")
    make_celeba(tmp_path, n=2, ids=(1, 2))
    assert availability_problems(side("celeba", tmp_path)) == []
    probs = availability_problems(side("celeba", tmp_path, split_file="missing.txt"))
    assert probs == [("split_file", f"split file not found: {tmp_path / 'missing.txt'}")]


# ---------------------------------------------------------------------------------------------- FFHQ


def make_ffhq(root, n=5):
    for i in range(n):
        _save(str(root / f"{i // 3:05d}" / f"{i:05d}.png"), (128, 128), (20, 20, 108, 108), inner=GREEN)
    return root


def test_ffhq_recursive_unlabeled_crop(tmp_path):
    make_ffhq(tmp_path)
    _save(str(tmp_path / "big" / "x.jpg"), (256, 256), quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    src = folders.load_ffhq(side("ffhq", tmp_path))
    assert len(src) == 6 and (src.labels == -1).all()
    assert [folders._rel(p, str(tmp_path)) for p in src.paths][:2] == ["00000/00000.png", "00000/00001.png"]
    im = src.image(0)
    assert im.shape == (88, 88, 3) and (im == GREEN).all()
    assert src.image(5).shape == (176, 176, 3)  # proportional: 88/128 of 256


def test_ffhq_split_and_availability(tmp_path):
    assert availability_problems(side("ffhq", tmp_path)) == [
        ("root", f"FFHQ: no images (png/jpg) found under {tmp_path} (expected layout: <root>/**/*.png, "
                 "e.g. the 128x128 thumbnails)")]
    make_ffhq(tmp_path)
    assert availability_problems(side("ffhq", tmp_path)) == []
    _write(str(tmp_path / "sel.txt"), "00001/00004.png\n00002.png\n")  # a relative path and a unique base name
    src = folders.load_ffhq(side("ffhq", tmp_path, split_file="sel.txt"))
    assert [os.path.basename(p) for p in src.paths] == ["00004.png", "00002.png"]
    _write(str(tmp_path / "bad.txt"), "00002.png\nnope.png\n")
    with pytest.raises(UserError, match=r"bad.txt:2: 'nope.png' is not an item of dataset 'ffhq'"):
        folders.load_ffhq(side("ffhq", tmp_path, split_file="bad.txt"))


def make_celeba_hd(root, ids=(7, 3, 3, 7, 3, 2), drop=(5,)):
    """HD-cropper output: 224 px faces named by CelebA stem (png), identity file lists every image;
    the images in ``drop`` (1-based) were dropped by the cropper. Present counts: id 3 x3, id 7 x2."""
    lines = []
    for i, ident in enumerate(ids, start=1):
        lines.append(f"{i:06d}.jpg {ident}")
        if i not in drop:
            _save(str(root / "images" / f"{i:06d}.png"), (224, 224), inner=GREEN)
    _write(str(root / "identity_CelebA.txt"), "\n".join(lines) + "\n")
    return root


def test_celeba_hd_ranks_identities_by_count_and_skips_dropped_images(tmp_path):
    make_celeba_hd(tmp_path)
    src = folders.load_celeba_hd(side("celeba_hd", tmp_path))
    assert [os.path.basename(p) for p in src.paths] == ["000001.png", "000002.png", "000003.png", "000004.png",
                                                        "000006.png"]
    # id 3 (3 images) -> 0, id 7 (2) -> 1, id 2 (1) -> 2; image 5 (id 3) was dropped by the cropper
    assert src.labels.tolist() == [1, 0, 0, 1, 2]
    assert src.image(0).shape == (224, 224, 3)  # no crop
    _write(str(tmp_path / "sel.txt"), "000006.png\n000002.png\n")  # select; keep the ranked labels
    sel = folders.load_celeba_hd(side("celeba_hd", tmp_path, split_file="sel.txt"))
    assert sel.labels.tolist() == [2, 0]
    assert availability_problems(side("celeba_hd", tmp_path)) == []
    (tmp_path / "identity_CelebA.txt").unlink()
    assert [m for _, m in availability_problems(side("celeba_hd", tmp_path))] == [
        f"CelebA HD: identity file not found: {tmp_path / 'identity_CelebA.txt'}"]


def test_ffhq_hd_uses_ppas_centre_crop(tmp_path):
    _save(str(tmp_path / "images1024x1024" / "00000.png"), (256, 256), (28, 28, 228, 228), inner=GREEN)
    src = get_info("ffhq_hd").load(side("ffhq_hd", tmp_path))
    im = src.image(0)
    assert im.shape == (200, 200, 3) and (im == GREEN).all()  # 800/1024 of 256 px, the painted box exactly


# ---------------------------------------------------------------------------------------------- FaceScrub


def test_facescrub_actors_actresses_merged(tmp_path):
    for group, person, n in (("actors", "Bob_B", 2), ("actors", "Al_A", 3), ("actresses", "Cy_C", 2)):
        for i in range(n):
            _save(str(tmp_path / group / "faces" / person / f"{person}_{i}.jpeg"), (64, 64), (5, 5, 59, 59),
                  fmt="PNG")
    os.makedirs(tmp_path / "actresses" / "faces" / "Empty_E")
    src = folders.load_facescrub(side("facescrub", tmp_path))
    assert src.class_names == ["Al_A", "Bob_B", "Cy_C"]
    assert sorted(src.labels.tolist()) == [0, 0, 0, 1, 1, 2, 2]
    for i, p in enumerate(src.paths):
        assert os.path.basename(os.path.dirname(p)) == src.class_names[src.labels[i]]
    im = src.image(0)
    assert im.shape == (54, 54, 3) and (im == RED).all()  # Diff-MI: centre 54 of 64


def test_facescrub_flat_layout_split_and_availability(tmp_path):
    assert availability_problems(side("facescrub", tmp_path))[0][0] == "root"
    assert "FaceScrub: no person folders found" in availability_problems(side("facescrub", tmp_path))[0][1]
    for person in ("Zed", "Amy"):
        for i in range(2):
            _save(str(tmp_path / person / f"{i}.jpg"), (80, 100), quality=90)
    assert availability_problems(side("facescrub", tmp_path)) == []
    src = folders.load_facescrub(side("facescrub", tmp_path))
    assert len(src) == 4 and src.labels.tolist() == [0, 0, 1, 1]
    assert src.image(0).shape == (84, 68, 3)  # 54/64 of 100 x 80
    _write(str(tmp_path / "s.txt"), "Zed/1.jpg 7\n")
    src = folders.load_facescrub(side("facescrub", tmp_path, split_file="s.txt"))
    assert src.labels.tolist() == [7]
    _write(str(tmp_path / "amb.txt"), "1.jpg\n")
    with pytest.raises(UserError, match="ambiguous"):
        folders.load_facescrub(side("facescrub", tmp_path, split_file="amb.txt"))


# ---------------------------------------------------------------------------------------------- CUB


def make_cub(root):
    rows = [  # id, class, path, image size, bbox x y w h
        (1, 1, "001.Albatross/a_1.png", (60, 40), (10.0, 5.0, 20.0, 15.0)),
        (2, 1, "001.Albatross/a_2.png", (50, 50), (0.0, 0.0, 50.0, 50.0)),
        (3, 3, "003.Sooty/s_1.png", (70, 45), (12.5, 7.4, 30.2, 20.1)),
    ]
    for iid, c, rel, size, (x, y, w, h) in rows:
        box = (int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h)))
        _save(str(root / "images" / rel), size, box, inner=GREEN)
    _write(str(root / "images.txt"), "".join(f"{r[0]} {r[2]}\n" for r in rows))
    _write(str(root / "image_class_labels.txt"), "".join(f"{r[0]} {r[1]}\n" for r in rows))
    _write(str(root / "bounding_boxes.txt"), "".join(f"{r[0]} {' '.join(map(str, r[4]))}\n" for r in rows))
    return root


def test_cub_bbox_crops(tmp_path):
    make_cub(tmp_path)
    src = folders.load_cub200(side("cub200", tmp_path))
    assert src.labels.tolist() == [0, 0, 2]
    a = src.image(0)
    assert a.shape == (15, 20, 3) and (a == GREEN).all()
    assert src.image(1).shape == (50, 50, 3)
    c = src.image(2)  # x 12.5..42.7 -> 12..43, y 7.4..27.5 -> 7..28
    assert c.shape == (21, 31, 3) and (c == GREEN).all()
    # the parent folder works too, and a split file selects by images.txt path or base name
    parent = tmp_path.parent / (tmp_path.name + "_parent")
    os.makedirs(parent)
    os.symlink(tmp_path, parent / "CUB_200_2011")
    _write(str(tmp_path / "pub.txt"), "s_1.png\n001.Albatross/a_2.png\n")
    src = folders.load_cub200(side("cub200", parent, split_file=str(tmp_path / "pub.txt")))
    assert src.labels.tolist() == [2, 0]
    assert src.image(0).shape == (21, 31, 3)


def test_cub_errors_and_availability(tmp_path):
    probs = availability_problems(side("cub200", tmp_path))
    assert [k for k, _ in probs] == ["root"] * 4
    assert probs[0][1].startswith(f"CUB-200-2011 file not found: {tmp_path / 'images.txt'}")
    assert probs[3][1].startswith(f"CUB-200-2011 images folder not found: {tmp_path / 'images'}")
    make_cub(tmp_path)
    assert availability_problems(side("cub200", tmp_path)) == []
    _write(str(tmp_path / "bounding_boxes.txt"), "1 10 5 20 15\n2 0 0 50\n")
    with pytest.raises(UserError, match=r"bounding_boxes.txt:2: expected 5 fields"):
        folders.load_cub200(side("cub200", tmp_path))
    _write(str(tmp_path / "bounding_boxes.txt"), "1 10 5 20 15\n2 0 0 50 50\n")
    with pytest.raises(UserError, match=r"images.txt:3: image id 3 has no bounding box"):
        folders.load_cub200(side("cub200", tmp_path))
    make_cub(tmp_path)
    os.remove(tmp_path / "images" / "003.Sooty" / "s_1.png")
    with pytest.raises(UserError, match=r"1 image\(s\) listed in .*images.txt.*s_1.png \(line 3\)"):
        folders.load_cub200(side("cub200", tmp_path))


# ---------------------------------------------------------------------------------------------- ChestX-ray14

CXR_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")


def make_chestxray(root, kaggle=True):
    rows = [("a.png", "Atelectasis"), ("b.png", "Hernia"), ("c.png", "No Finding"), ("d.png", "Mass|Nodule"),
            ("e.png", "No Finding"), ("f.png", "Pleural_Thickening")]
    for j, (name, _) in enumerate(rows):
        d = root / (f"images_00{1 + j % 2}" if kaggle else "") / "images"
        mode = {0: "L", 1: "RGBA"}.get(j, "L")
        _save(str(d / name), (40, 32), (4, 0, 36, 32), fill=(0, 0, 0), inner=(200, 200, 200), mode=mode)
    _write(str(root / "Data_Entry_2017.csv"),
           CXR_HEADER + "".join(f"{n},{f},0,{k},50,M,PA,40,32,0.1,0.1,\n" for k, (n, f) in enumerate(rows)))
    return root


def test_chestxray_single_label_gray(tmp_path):
    make_chestxray(tmp_path)
    src = folders.load_chestxray(side("chestxray", tmp_path))
    assert [os.path.basename(p) for p in src.paths] == ["a.png", "b.png", "c.png", "e.png", "f.png"]
    assert src.labels.tolist() == [0, 13, 14, 14, 12]  # multi-label d.png dropped; No Finding = 14
    for i in range(len(src)):
        im = src.image(i)
        assert im.shape == (32, 32, 1) and im.dtype == np.uint8
        assert (im == 200).all()  # centre square of 40x32 = the bright box
    # 16-bit PNGs are scaled to 8 bits
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "images_001" / "images" / "a.png")
    assert (src.image(0) == 255).all()


def test_chestxray_classes_select_through_split(tmp_path):
    make_chestxray(tmp_path, kaggle=False)
    pub = side("chestxray", tmp_path, classes=[14])
    priv = side("chestxray", tmp_path, classes=list(range(14)))
    assert availability_problems(pub) == [] and availability_problems(priv) == []
    src = folders.load_chestxray(priv)
    assert (np.isin(src.labels, [14]).sum(), len(src)) == (2, 5)


def test_chestxray_errors_and_availability(tmp_path):
    probs = availability_problems(side("chestxray", tmp_path))
    assert [k for k, _ in probs] == ["root", "root"]
    assert probs[0][1].startswith(f"ChestX-ray14 label file not found: {tmp_path / 'Data_Entry_2017.csv'}")
    assert probs[1][1].startswith("ChestX-ray14 images folder not found")
    make_chestxray(tmp_path)
    assert availability_problems(side("chestxray", tmp_path)) == []
    with open(tmp_path / "Data_Entry_2017.csv", "a") as f:
        f.write("z.png,Flu,0,9,50,M,PA,40,32,0.1,0.1,\n")
    with pytest.raises(UserError, match=r"Data_Entry_2017.csv:8: unknown finding 'Flu'"):
        folders.load_chestxray(side("chestxray", tmp_path))
    _write(str(tmp_path / "Data_Entry_2017.csv"), "Image,Labels\na.png,Mass\n")
    with pytest.raises(UserError, match=r"Data_Entry_2017.csv:1: .*lacks the column"):
        folders.load_chestxray(side("chestxray", tmp_path))
    _write(str(tmp_path / "Data_Entry_2017.csv"), CXR_HEADER + "a.png,Mass\nq.png,Edema\n")
    with pytest.raises(UserError, match=r"1 image\(s\) listed in .*q.png \(line 3\)"):
        folders.load_chestxray(side("chestxray", tmp_path))
    _write(str(tmp_path / "have.txt"), "a.png\n")  # a split file restricts to the images present
    assert folders.load_chestxray(side("chestxray", tmp_path, split_file="have.txt")).labels.tolist() == [4]


# ---------------------------------------------------------------------------------------------- CheXpert


def make_chexpert(base, prefix=folders.CHEXPERT_DIR + "/"):
    """``base``/CheXpert-v1.0-small/{train.csv, train/...}; CSV paths start with ``prefix``."""
    root = base / folders.CHEXPERT_DIR
    rows = [("patient1/study1/view1_frontal.jpg", "Frontal", (40, 30)),
            ("patient1/study1/view2_lateral.jpg", "Lateral", (40, 30)),
            ("patient2/study1/view1_frontal.jpg", "Frontal", (32, 32)),
            ("patient3/study1/view2_frontal.jpg", "Frontal", (40, 30)),
            ("patient4/study1/view1_lateral.jpg", "Lateral", (32, 32))]
    lines = ["Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding"]
    for rel, view, size in rows:
        _save(str(root / "train" / rel), size, fill=(90, 90, 90), mode="L", quality=95)
        lines.append(f"{prefix}train/{rel},Male,60,{view},AP,1.0")
    _write(str(root / "train.csv"), "\n".join(lines) + "\n")
    return root


def test_chexpert_view1_frontal_square(tmp_path):
    root = make_chexpert(tmp_path)
    for r in (root, tmp_path):  # the CheXpert folder itself or its parent
        s = side("chexpert", r)
        assert availability_problems(s) == []
        src = folders.load_chexpert(s)
        assert len(src) == 2 and (src.labels == -1).all()
        assert src.image(0).shape == (30, 30, 1) and src.image(1).shape == (32, 32, 1)
        assert abs(int(src.image(0).mean()) - 90) <= 3
    sq = folders.load_chexpert_square(side("chexpert_square", root))
    assert len(sq) == 1 and sq.paths[0].endswith("patient2/study1/view1_frontal.jpg")


def test_chexpert_paths_relative_to_root_and_errors(tmp_path):
    root = make_chexpert(tmp_path, prefix="")
    src = folders.load_chexpert(side("chexpert", root))
    assert len(src) == 2 and os.path.isfile(src.paths[0])
    os.remove(src.paths[1])
    with pytest.raises(UserError, match=r"image file not found: .*patient2.*\(listed in .*train.csv, line 4\)"):
        src.image(1)
    empty = tmp_path / "empty"
    os.makedirs(empty)
    assert availability_problems(side("chexpert", empty)) == [
        ("root", f"CheXpert label file not found: {empty / 'train.csv'} (expected layout: "
                 f"{folders.CHEXPERT_LAYOUT})")]
    _write(str(root / "train.csv"), "Path,Frontal/Lateral\nCheXpert-v1.0-small/train/nowhere/view1_frontal.jpg,Frontal\n")
    with pytest.raises(UserError, match="cannot find the first image"):
        folders.load_chexpert(side("chexpert", root))


# ---------------------------------------------------------------------------------------------- plug-in


def test_missing_root_message_for_every_folder_dataset(tmp_path):
    for n in ("celeba", "celeba_hd", "ffhq", "ffhq_hd", "facescrub", "cub200", "chestxray", "chexpert"):
        assert availability_problems(DataSide(dataset=n)) == [
            ("root", f"dataset '{n}' reads a folder: set root to it")]
        with pytest.raises(UserError, match="dataset folder not found"):
            get_info(n).load(side(n, tmp_path / "absent"))


def test_make_split_and_materialize_celeba_ffhq(tmp_path):
    priv = make_celeba(tmp_path / "celeba", n=9, ids=(1, 1, 1, 2, 2, 2, 3, 3, 3), png=True)
    pub = make_ffhq(tmp_path / "ffhq", n=4)
    data = DataConfig(private=DataSide(dataset="celeba", root=str(priv), classes=[2, 0]),
                      public=DataSide(dataset="ffhq", root=str(pub)),
                      image_size=16, channels=3, test_fraction=0.34)
    assert availability_problems(data.private) == [] and availability_problems(data.public) == []
    split = make_split(data, seed=0)
    assert split.private_classes == [2, 0] and len(split.public) == 4
    assert len(split.private_train) == 4 and len(split.private_test) == 2
    t = materialize(split, data)
    assert t.train_x.shape == (4, 3, 16, 16) and t.public_x.shape == (4, 3, 16, 16)
    assert sorted(t.train_y.tolist()) == [0, 0, 1, 1] and t.num_classes == 2
    # the official crops leave only the painted boxes: red faces, green public faces
    assert torch_allclose(t.train_x[:, 0], 1.0) and torch_allclose(t.public_x[:, 1], 1.0)


def torch_allclose(x, v, atol=1e-4):
    return bool((x - v).abs().max() < atol)


def test_load_images_in_chunks_equals_all_at_once(tmp_path):
    """materialize decodes a few images at a time; the tensors are exactly those of one big batch."""
    import torch

    from diffmi_ray.data.splits import _gather, load_images, load_source, to_tensor

    make_ffhq(tmp_path / "ffhq", n=5)
    _save(str(tmp_path / "ffhq" / "big" / "x.jpg"), (256, 256), quality=95)  # another native size
    src = folders.load_ffhq(side("ffhq", tmp_path / "ffhq"))
    idx = np.array([5, 0, 3, 1, 4, 2])
    for size, ch in ((16, 3), (8, 1)):
        ref = to_tensor(_gather(src, idx), size, ch)
        assert torch.equal(load_images(src, idx, size, ch, chunk=4), ref)
    mnist = load_source(DataSide(dataset="mnist5k"))
    idx = np.arange(0, 50, 3)
    assert torch.equal(load_images(mnist, idx, 32, 1, chunk=5), to_tensor(_gather(mnist, idx), 32, 1))
    assert load_images(mnist, idx[:0], 32, 1).shape == (0, 1, 32, 32)


def test_lazy_images_slice_subset_and_load(tmp_path):
    """LazyImages: slices load exactly what materialize holds; index subsets stay lazy."""
    import torch

    from diffmi_ray.data.splits import LazyImages, load_images, load_source

    mnist = load_source(DataSide(dataset="mnist5k"))
    idx = np.arange(100, 140)
    lazy = LazyImages(mnist, idx, 16, 1)
    full = load_images(mnist, idx, 16, 1)
    assert len(lazy) == 40 and lazy.shape == (40, 1, 16, 16)
    assert torch.equal(lazy[5:17], full[5:17]) and torch.equal(lazy.load(), full)
    sub = lazy[torch.tensor([3, 3, 0])]
    assert isinstance(sub, LazyImages) and torch.equal(sub.load(), full[[3, 3, 0]])
