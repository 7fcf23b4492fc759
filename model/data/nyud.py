"""NYUD-v2 in the multi-task layout `NYUD_MT` (MTI-Net release; the png release of ATRC/InvPT too).

MTI-Net release: images/<id>.jpg, segmentation/<id>.png (0 = void, class = value - 1), depth/<id>.npy
(metres, 0 = invalid), normals/<id>.npy (HxWx3 in [-1,1], all-zero = invalid), edge/<id>.npy,
gt_sets/{train,val}.txt. The ATRC/InvPT release stores images, normals (2x/255 - 1) and edges as png.
"""
import numpy as np

from .base import LayoutDataset, log, read_png, read_rgb

RELEASES = {
    "jpg": "MTI-Net NYUD_MT release (jpg images, npy depth/normals/edges)",
    "png": "ATRC/InvPT NYUD_MT release (png images/normals/edges, npy depth)",
}


class NYUD(LayoutDataset):
    name = "nyud"
    layout = "NYUD_MT"
    layout_desc = ("images/, segmentation/, depth/, normals/, edge/, gt_sets/{train,val}.txt "
                   "(MTI-Net: jpg/png/npy; ATRC/InvPT: png/npy)")
    split_file = "gt_sets/{split}.txt"
    tasks_available = ("semseg", "depth", "normals", "edge")
    sizes = (480, 640)

    def __init__(self, root, split="train", tasks=None, transform=None):
        super().__init__(root, split, tasks, transform)
        self.release = RELEASES[self.files[0]["image"].suffix.lstrip(".")]
        log.info("NYUD: read the %s from %s (%s, %d images)", self.release, self.root, split, len(self))

    def paths(self, id_):
        p = {"image": [f"images/{id_}.jpg", f"images/{id_}.png"]}
        names = {"semseg": ("segmentation", ["png"]), "depth": ("depth", ["npy"]),
                 "normals": ("normals", ["npy", "png"]), "edge": ("edge", ["npy", "png"])}
        for t in self.tasks:
            folder, exts = names[t]
            p[t] = [f"{folder}/{id_}.{e}" for e in exts]
        return p

    def load(self, id_, files):
        out = {"image": read_rgb(files["image"])}
        if "semseg" in files:
            lab = read_png(files["semseg"]).astype(np.int64)
            out["semseg"] = np.where((lab == 0) | (lab > 40), 255, lab - 1)
        if "depth" in files:
            d = np.load(files["depth"]).astype(np.float32)
            out["depth"] = np.where(np.isfinite(d) & (d > 0), d, 0.0).squeeze()
        if "normals" in files:
            out["normals"] = _read_normals(files["normals"])
        if "edge" in files:
            f = files["edge"]
            e = np.load(f) if f.suffix == ".npy" else read_png(f) / 255.0
            out["edge"] = (np.asarray(e, np.float32).squeeze() > 0.5).astype(np.float32)
        return out

    def __repr__(self):
        return super().__repr__()[:-1] + f", release={self.release!r})"


def _read_normals(path):
    if path.suffix == ".npy":
        n = np.load(path).astype(np.float32)
        return np.where(np.isfinite(n), n, 0.0)
    raw = read_png(path)[..., :3]
    n = 2.0 * raw.astype(np.float32) / 255.0 - 1.0
    # a png cannot hold the all-zero vector: black pixels mark the invalid ones
    n[(raw == 0).all(-1)] = 0.0
    return n
