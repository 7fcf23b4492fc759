"""PASCAL-Context in the multi-task layout `PASCAL_MT` (MTI-Net release).

JPEGImages/<id>.jpg; ImageSets/Context/{train,val}.txt; semseg/VOC12/<id>.png else
semseg/pascal-context/<id>.png (21 classes, 255 ignored); human_parts/<id>.mat (PASCAL-Part `anno`
struct); edges from the Laplacian of `LabelMap` in pascal-context/trainval/<id>.mat, thinned to 1 px;
distilled normals normals_distill/<id>.png (2x/255 - 1, kept on Context classes that NYU also has);
distilled saliency sal_distill/<id>.png (x/255 > 0.5).
"""
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.io
from scipy import ndimage

from .base import LayoutDataset, log, read_png, read_rgb

DB_INFO = Path(__file__).resolve().parent.parent / "db_info"
PERSON = 15
# PASCAL-Part person parts -> 6 parts (0 = background), as MTI-Net
HUMAN_PARTS = {
    **dict.fromkeys(("head", "hair", "lear", "rear", "leye", "reye", "lebrow", "rebrow", "nose", "mouth"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}


@lru_cache(maxsize=None)
def normals_valid_classes():
    """Context class indices whose name NYU also has (not 'unknown'), plus tvmonitor (as MTI-Net)."""
    nyu = json.loads((DB_INFO / "nyu_classes.json").read_text())
    context = json.loads((DB_INFO / "context_classes.json").read_text())
    valid = {context[name] for name in nyu if name in context and name != "unknown"}
    valid.add(context["tvmonitor"])
    return np.array(sorted(valid))


class PASCALContext(LayoutDataset):
    name = "pascal"
    layout = "PASCAL_MT"
    layout_desc = ("JPEGImages/, ImageSets/Context/{train,val}.txt, semseg/{VOC12,pascal-context}/, "
                   "human_parts/, pascal-context/trainval/, normals_distill/, sal_distill/")
    split_file = "ImageSets/Context/{split}.txt"
    tasks_available = ("semseg", "human_parts", "sal", "normals", "edge")
    optional_maps = ("human_parts",)  # no .mat: no annotated people, all ignored
    release = "MTI-Net PASCAL_MT release"

    def __init__(self, root, split="train", tasks=None, transform=None):
        super().__init__(root, split, tasks, transform)
        log.info("PASCAL: read the %s from %s (%s, %d images)", self.release, self.root, split, len(self))

    def paths(self, id_):
        p = {"image": [f"JPEGImages/{id_}.jpg"]}
        if "semseg" in self.tasks:
            p["semseg"] = [f"semseg/VOC12/{id_}.png", f"semseg/pascal-context/{id_}.png"]
        if "human_parts" in self.tasks:
            p["human_parts"] = [f"human_parts/{id_}.mat"]
        if "edge" in self.tasks or "normals" in self.tasks:
            p["labelmap"] = [f"pascal-context/trainval/{id_}.mat"]
        if "normals" in self.tasks:
            p["normals"] = [f"normals_distill/{id_}.png"]
        if "sal" in self.tasks:
            p["sal"] = [f"sal_distill/{id_}.png"]
        return p

    def load(self, id_, files):
        img = read_rgb(files["image"])
        out = {"image": img}
        if "semseg" in files:
            out["semseg"] = read_png(files["semseg"]).astype(np.int64)
        if "human_parts" in files:
            out["human_parts"] = load_human_parts(files["human_parts"], img.shape[:2])
        if "labelmap" in files:
            labelmap = scipy.io.loadmat(files["labelmap"])["LabelMap"]
            if "edge" in self.tasks:
                out["edge"] = edges_from_labelmap(labelmap)
            if "normals" in self.tasks:
                n = 2.0 * read_png(files["normals"])[..., :3].astype(np.float32) / 255.0 - 1.0
                n[~np.isin(labelmap, normals_valid_classes())] = 0.0
                out["normals"] = n
        if "sal" in files:
            s = read_png(files["sal"]).astype(np.float32)
            s = s[..., 0] if s.ndim == 3 else s
            out["sal"] = (s / 255.0 > 0.5).astype(np.float32)
        return out


def load_human_parts(path, shape):
    """6 parts + background from the people of a PASCAL-Part `anno` struct; all 255 without people."""
    if path is None:
        return np.full(shape, 255, np.int64)
    objects = scipy.io.loadmat(path)["anno"][0, 0]["objects"].ravel()
    target = None
    for obj in objects:
        parts = obj["parts"]
        if int(np.asarray(obj["class_ind"]).ravel()[0]) != PERSON or parts.size == 0:
            continue
        if target is None:
            target = np.zeros(np.asarray(obj["mask"]).shape, np.int64)
        for part in parts.ravel():
            name = str(np.asarray(part["part_name"]).ravel()[0])
            target[np.asarray(part["mask"]).astype(bool)] = HUMAN_PARTS[name]
    return np.full(shape, 255, np.int64) if target is None else target


def edges_from_labelmap(labelmap):
    """Non-zero Laplacian of the Context label map (cv2 border = scipy 'mirror'), thinned to 1 px."""
    lap = ndimage.laplace(labelmap.astype(np.float64), mode="mirror")
    return thin(np.abs(lap) > 0).astype(np.float32)


def _thin_luts():
    # Guo-Hall thinning conditions over the 8 neighbours (bit i = neighbour i counter-clockwise from
    # east), the same tables as skimage.morphology.thin, which MTI-Net uses
    def bits(n):
        return [bool(n >> i & 1) for i in range(8)]

    def g12(b):
        g1 = sum(1 for i in (0, 2, 4, 6) if not b[i] and (b[i + 1] or b[(i + 2) % 8])) == 1
        n1 = sum(1 for k in (1, 3, 5, 7) if b[k] or b[k - 1])
        n2 = sum(1 for k in (1, 3, 5, 7) if b[k] or b[(k + 1) % 8])
        return g1 and min(n1, n2) in (2, 3)

    lut1 = np.array([g12(bits(n)) and not ((bits(n)[1] or bits(n)[2] or not bits(n)[7]) and bits(n)[0])
                     for n in range(256)])
    lut2 = np.array([g12(bits(n)) and not ((bits(n)[5] or bits(n)[6] or not bits(n)[3]) and bits(n)[4])
                     for n in range(256)])
    return lut1, lut2


_LUTS = _thin_luts()
_NEIGHBOUR_BITS = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.int32)


def thin(mask, max_iter=None):
    """Morphological thinning of a binary mask to 1-px lines (Guo-Hall, as skimage.morphology.thin)."""
    skel = np.asarray(mask, dtype=bool).astype(np.int32)
    n_old, n_new, it = -1, int(skel.sum()), 0
    while n_old != n_new and (max_iter is None or it < max_iter):
        n_old = n_new
        for lut in _LUTS:
            code = ndimage.correlate(skel, _NEIGHBOUR_BITS, mode="constant")
            skel[np.take(lut, code) & (skel > 0)] = 0
        n_new, it = int(skel.sum()), it + 1
    return skel.astype(bool)
