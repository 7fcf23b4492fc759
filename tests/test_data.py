"""Data sets: tiny NYUD_MT / PASCAL_MT trees written here, the synthetic scenes, transforms, errors."""
import json

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from model.data import DatasetError, build_dataset, collate, num_outputs, render_scene
from model.data.pascal import DB_INFO, normals_valid_classes, thin
from model.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomHorizontalFlip, scale_rotate

H, W = 12, 16


def _unnormalise(image):
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def _write_nyud(root, ids=("0001", "0002"), image_ext="jpg"):
    rng = np.random.default_rng(0)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / f"images/{i}.{image_ext}")
        seg = np.zeros((H, W), np.uint8)
        seg[:, 4:8], seg[:, 8:] = 1, 40    # 0 = void, 1 -> class 0, 40 -> class 39
        Image.fromarray(seg).save(root / f"segmentation/{i}.png")
        depth = np.full((H, W), 2.5, np.float32)
        depth[0] = 0                       # invalid row
        np.save(root / f"depth/{i}.npy", depth)
        normals = np.zeros((H, W, 3), np.float32)
        normals[..., 2] = 1
        normals[:, 0] = 0                  # invalid column
        np.save(root / f"normals/{i}.npy", normals)
        edge = np.zeros((H, W), np.float32)
        edge[:, 7] = 1
        np.save(root / f"edge/{i}.npy", edge)
    (root / "gt_sets/train.txt").write_text("\n".join(ids) + "\n")


def test_nyud_layout_loads_through_the_factory(tmp_path, caplog):
    _write_nyud(tmp_path)
    with caplog.at_level("INFO", logger="model.data"):
        ds = build_dataset("nyud", tmp_path, "train", size=(H, W))
    assert "MTI-Net NYUD_MT release" in ds.release and "MTI-Net NYUD_MT release" in caplog.text
    assert len(ds) == 2
    s = ds[0]
    assert s["image"].shape == (3, H, W) and s["meta"] == {"id": "0001", "size": (H, W), "dataset": "nyud"}
    assert s["semseg"].dtype == torch.long
    assert s["semseg"][0, 0] == 255 and s["semseg"][0, 5] == 0 and s["semseg"][0, 10] == 39
    assert s["depth"].shape == (1, H, W) and s["depth"][0, 0].eq(0).all() and s["depth"][0, 1, 0] == 2.5
    assert s["normals"].shape == (3, H, W) and s["normals"][:, :, 0].eq(0).all()
    assert s["edge"][0, :, 7].eq(1).all() and s["edge"].sum() == H
    batch = collate([ds[0], ds[1]])
    assert batch["semseg"].shape == (2, H, W) and [m["id"] for m in batch["meta"]] == ["0001", "0002"]
    assert num_outputs("nyud") == {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}


def test_nyud_png_release_is_recognised_and_resized(tmp_path):
    _write_nyud(tmp_path, image_ext="png")
    ds = build_dataset("nyud", tmp_path, "train", tasks=["semseg", "depth"], size=(6, 8))
    assert "ATRC/InvPT" in ds.release
    s = ds[1]
    assert set(s) == {"image", "semseg", "depth", "meta"}
    assert s["image"].shape == (3, 6, 8) and s["semseg"].shape == (6, 8) and s["meta"]["size"] == (H, W)


def test_nyud_errors_say_what_was_expected_where(tmp_path):
    with pytest.raises(DatasetError, match=r"NYUD_MT root .*missing.* does not exist.*expected the NYUD_MT layout"):
        build_dataset("nyud", tmp_path / "missing")
    with pytest.raises(DatasetError, match=r"has no gt_sets/train.txt; expected the NYUD_MT layout: images/"):
        build_dataset("nyud", tmp_path)
    _write_nyud(tmp_path)
    (tmp_path / "depth/0002.npy").unlink()
    with pytest.raises(DatasetError, match=r"missing depth/0002.npy for id '0002'"):
        build_dataset("nyud", tmp_path, tasks=["depth"])
    with pytest.raises(DatasetError, match=r"unknown task.*'sal'.*'nyud'; available: semseg, depth"):
        build_dataset("nyud", tmp_path, tasks=["semseg", "sal"])
    with pytest.raises(DatasetError, match=r"unknown data set 'cityscapes'; expected one of synthetic"):
        build_dataset("cityscapes", tmp_path)


def _context_classes():
    return json.loads((DB_INFO / "context_classes.json").read_text())


def _anno(objects):
    """A PASCAL-Part `anno` struct as savemat writes it: objects of (class, class_ind, mask, parts)."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for k, (cls_ind, mask, parts) in enumerate(objects):
        if parts:
            p = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (name, m) in enumerate(parts):
                p[0, j] = (name, m.astype(np.uint8))
        else:
            p = np.zeros((0, 0))
        objs[0, k] = ("person" if cls_ind == 15 else "other", np.array([[cls_ind]]), mask.astype(np.uint8), p)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("x", objs)
    return {"anno": anno}


def _write_pascal(root):
    context = _context_classes()
    bed, plane = context["bed"], context["aeroplane"]    # bed is also an NYU class, aeroplane is not
    for d in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "semseg/pascal-context", "human_parts",
              "pascal-context/trainval", "normals_distill", "sal_distill"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / f"JPEGImages/{i}.jpg")
        seg = np.zeros((H, W), np.uint8)
        seg[:, 8:] = 15 if i == "a" else 3
        seg[0] = 255
        Image.fromarray(seg).save(root / ("semseg/VOC12" if i == "a" else "semseg/pascal-context") / f"{i}.png")
        labelmap = np.full((H, W), plane, np.uint16)
        labelmap[:, 8:] = bed
        scipy.io.savemat(root / f"pascal-context/trainval/{i}.mat", {"LabelMap": labelmap})
        normals = np.zeros((H, W, 3), np.uint8)
        normals[..., 2] = 255               # (.., 1) after 2x/255 - 1
        Image.fromarray(normals).save(root / f"normals_distill/{i}.png")
        sal = np.zeros((H, W), np.uint8)
        sal[2:5, 2:5], sal[6, 6] = 200, 100  # 200/255 > 0.5, 100/255 is not
        Image.fromarray(sal).save(root / f"sal_distill/{i}.png")
    person = np.zeros((H, W), bool)
    person[:, 8:12] = True
    head, luarm, llleg = (np.zeros((H, W), bool) for _ in range(3))
    head[0:3, 8:12], luarm[3:6, 8:10], llleg[9:12, 8:12] = True, True, True
    car = np.zeros((H, W), bool)
    car[:, 0:4] = True
    scipy.io.savemat(root / "human_parts/a.mat", _anno([
        (15, person, [("head", head), ("luarm", luarm), ("llleg", llleg)]),
        (7, car, [("fwheel", car)]),
        (15, np.zeros((H, W), bool), []),    # a person without parts adds nothing
    ]))
    (root / "ImageSets/Context/train.txt").write_text("a\nb\n")


def test_pascal_layout_loads_all_five_tasks(tmp_path):
    _write_pascal(tmp_path)
    ds = build_dataset("pascal", tmp_path, "train", size=(H, W))
    a, b = ds[0], ds[1]
    assert a["semseg"][0].eq(255).all() and a["semseg"][1, 9] == 15 and b["semseg"][1, 9] == 3
    # human parts: background 0 inside the image with people, head 1, upper arm 3, lower leg 6
    hp = a["human_parts"]
    assert hp[1, 9] == 1 and hp[4, 8] == 3 and hp[10, 9] == 6 and hp[7, 9] == 0 and hp[7, 2] == 0
    assert b["human_parts"].eq(255).all()        # no .mat: no people
    # edges: the label map changes between columns 7 and 8 (Laplacian marks both), thinned to one
    # pixel per row (the thinning may shorten the line's end by a pixel)
    edge = a["edge"][0]
    assert edge.sum(1).le(1).all() and edge[:, 7:9].sum() >= H - 1 and edge.sum() == edge[:, 7:9].sum(), edge
    # normals kept only on the NYU class (bed, columns 8..)
    assert a["normals"][:, :, :8].eq(0).all() and a["normals"][2, :, 8:].eq(1).all()
    assert a["sal"][0, 3, 3] == 1 and a["sal"][0, 6, 6] == 0 and a["sal"].sum() == 9
    assert num_outputs("pascal", ["semseg", "human_parts", "sal"]) == {"semseg": 21, "human_parts": 7, "sal": 1}


def test_pascal_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"has no ImageSets/Context/val.txt; expected the PASCAL_MT layout"):
        build_dataset("pascal", tmp_path, "val")
    _write_pascal(tmp_path)
    (tmp_path / "sal_distill/b.png").unlink()
    build_dataset("pascal", tmp_path, tasks=["semseg"])    # saliency not asked for: fine
    with pytest.raises(DatasetError, match=r"missing sal_distill/b.png for id 'b'"):
        build_dataset("pascal", tmp_path, tasks=["sal"])
    with pytest.raises(DatasetError, match=r"unknown task.*'depth'.*'pascal'"):
        build_dataset("pascal", tmp_path, tasks=["depth"])


def test_normals_classes_are_nyu_names_plus_tvmonitor():
    valid = set(normals_valid_classes().tolist())
    context = _context_classes()
    assert context["tvmonitor"] in valid and context["bed"] in valid and context["aeroplane"] not in valid


def test_thin_reduces_a_two_pixel_line_to_one():
    m = np.zeros((10, 10), bool)
    m[2:8, 4:6] = True
    t = thin(m)
    assert t[3:7].sum(1).tolist() == [1, 1, 1, 1], t.astype(int)


def test_synthetic_is_deterministic_from_seed_and_index():
    a = build_dataset("synthetic", split="train", size=(48, 64), length=4)
    b = build_dataset("synthetic", split="train", size=(48, 64), length=4)
    for k in ("image", "semseg", "depth", "normals", "edge", "human_parts", "sal"):
        assert torch.equal(a[2][k], b[2][k]), k
    assert not torch.equal(a[1]["depth"], a[2]["depth"])
    other = build_dataset("synthetic", split="train", size=(48, 64), length=4, seed=1)
    assert not torch.equal(a[2]["depth"], other[2]["depth"])
    val = build_dataset("synthetic", split="val", size=(48, 64), length=4)
    assert not torch.equal(a[2]["depth"], val[2]["depth"])


@pytest.mark.parametrize("index", range(6))
def test_synthetic_labels_agree(index):
    s = render_scene(seed=3, index=index, size=(96, 128))
    valid = np.abs(s["normals"]).sum(-1) > 0
    assert valid.all() and np.allclose(np.linalg.norm(s["normals"], axis=-1), 1, atol=1e-4)
    assert s["semseg"].min() >= 0 and s["semseg"].max() < num_outputs("synthetic")["semseg"]
    assert (s["depth"] > 0).all()
    # edges wherever the class changes to the right or below
    change = np.zeros_like(s["edge"], bool)
    change[:, :-1] |= s["semseg"][:, :-1] != s["semseg"][:, 1:]
    change[:-1] |= s["semseg"][:-1] != s["semseg"][1:]
    assert s["edge"][change].all()
    assert set(np.unique(s["edge"])) <= {0.0, 1.0} and set(np.unique(s["sal"])) <= {0.0, 1.0}
    figure = s["semseg"] == 6
    if figure.any():
        assert (s["human_parts"][figure] >= 1).all() and (s["human_parts"][figure] <= 6).all()
        assert (s["human_parts"][~figure] == 0).all() and (s["sal"] == figure).all()
    else:
        assert (s["human_parts"] == 255).all() and np.isin(s["semseg"][s["sal"] > 0], [4, 5]).all()
    # camera frame x right, y up, z towards the camera; the camera pitches down at most 0.35 rad
    assert (s["normals"][s["semseg"] == 0][:, 1] > 0.9).all()     # floor faces up
    assert (s["normals"][s["semseg"] == 2][:, 1] < -0.9).all()    # ceiling faces down


def test_synthetic_renders_fast_enough():
    import time
    render_scene(0, 0, 256)
    t = time.perf_counter()
    for i in range(5):
        render_scene(0, i, 256)
    assert (time.perf_counter() - t) / 5 < 0.5   # ~30 ms on an idle core; loose for busy CI machines


def _sample():
    s = {"image": torch.rand(3, 9, 11), "semseg": torch.randint(0, 5, (9, 11)),
         "depth": torch.rand(1, 9, 11) + 1, "normals": torch.nn.functional.normalize(torch.randn(3, 9, 11), dim=0),
         "meta": {"id": "x"}}
    s["normals"][:, 0, 0] = 0
    return s


def test_flip_negates_normals_x():
    s = _sample()
    ref = {k: v.clone() for k, v in s.items() if k != "meta"}
    out = RandomHorizontalFlip(p=1.0)(s)
    assert torch.equal(out["normals"][0], -ref["normals"][0].flip(-1))
    assert torch.equal(out["normals"][1:], ref["normals"][1:].flip(-1))
    assert torch.equal(out["semseg"], ref["semseg"].flip(-1)) and out["meta"] == {"id": "x"}


def test_rotation_turns_normals_and_keeps_them_unit():
    s = _sample()
    s["normals"][:] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)   # facing right
    out = scale_rotate(s, 1.0, 90.0)
    n = out["normals"]
    valid = n.abs().sum(0) > 0
    assert torch.allclose(n.norm(dim=0)[valid], torch.ones(()), atol=1e-5)
    # counter-clockwise by 90 degrees (as displayed): a normal facing right now faces up (+y)
    assert torch.allclose(n[:, valid], torch.tensor([0.0, 1.0, 0.0]).view(3, 1), atol=1e-5)
    s = _sample()
    out = scale_rotate(s, 1.0, 33.0)
    valid = out["normals"].abs().sum(0) > 0
    assert torch.allclose(out["normals"].norm(dim=0)[valid], torch.ones(()), atol=1e-5)
    assert (out["semseg"][~valid] == 255).all() or (~valid).sum() <= 1


def test_zoom_divides_depth_and_marks_outside_pixels_ignored():
    s = _sample()
    s["depth"][:] = 3.0
    out = scale_rotate(s, 1.5, 0.0)
    assert torch.allclose(out["depth"], torch.full_like(out["depth"], 2.0))
    out = scale_rotate(_sample(), 0.5, 0.0)    # zoom out: a border from outside the frame
    assert out["semseg"][0].eq(255).all() and out["depth"][0, 0].eq(0).all() and out["normals"][:, 0].eq(0).all()


def test_augmented_synthetic_batches_through_a_dataloader():
    ds = build_dataset("synthetic", split="train", size=32, augment=True, length=4)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["normals"].shape == (4, 3, 32, 32)
    assert _unnormalise(batch["image"]).min() > -1e-4
