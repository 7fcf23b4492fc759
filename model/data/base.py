"""What the data sets share: one-line errors, split files, numpy -> sample tensors, a file-backed base."""
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger("model.data")


class DatasetError(ValueError):
    """A data set request or its files on disk are not what was expected; the message is one line."""


def check_tasks(dataset, tasks, available):
    tasks = tuple(available) if tasks is None else tuple(tasks)
    unknown = [t for t in tasks if t not in available]
    if unknown or not tasks:
        raise DatasetError(f"unknown task(s) {unknown or '(none given)'} for data set '{dataset}'; "
                           f"available: {', '.join(available)}")
    return tasks


def to_sample(arrays):
    """numpy maps (image HxWx3 uint8 or [0,1] float, labels HxW, normals HxWx3) -> sample tensors."""
    out = {}
    for k, a in arrays.items():
        if k == "image":
            a = np.asarray(a)
            scale = 255.0 if a.dtype == np.uint8 else 1.0
            out[k] = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float() / scale
        elif k in ("semseg", "human_parts"):
            out[k] = torch.from_numpy(np.asarray(a, dtype=np.int64))
        elif k == "normals":
            out[k] = torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(2, 0, 1)))
        elif k in ("depth", "edge", "sal"):
            out[k] = torch.from_numpy(np.asarray(a, dtype=np.float32))[None]
        else:
            raise KeyError(k)
    return out


def collate(batch):
    """Stack the tensors of a list of samples; "meta" stays a list of dicts."""
    out = {k: torch.stack([s[k] for s in batch]) for k in batch[0] if k != "meta"}
    if "meta" in batch[0]:
        out["meta"] = [s["meta"] for s in batch]
    return out


def read_rgb(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im)


class LayoutDataset(Dataset):
    """A data set read from a directory layout: ids from a split file, one file per id and map.

    Subclasses set `layout` (its name), `layout_desc` (what the root should hold), `split_file`
    (relative path with {split}), `tasks_available`, `optional_maps`, and implement `paths(id)` -> {key: candidates}
    and `load(id, files)` -> numpy maps.
    """

    layout = ""
    layout_desc = ""
    split_file = ""
    tasks_available = ()
    optional_maps = ()  # maps whose missing file means "all ignore" rather than an error

    def __init__(self, root, split="train", tasks=None, transform=None):
        self.tasks = check_tasks(self.name, tasks, self.tasks_available)
        self.root = Path(root) if root is not None else None
        self.split = split
        self.transform = transform
        where = f"expected the {self.layout} layout: {self.layout_desc}"
        if self.root is None or not self.root.is_dir():
            raise DatasetError(f"{self.layout} root {self.root} does not exist or is not a directory; {where}")
        split_path = self.root / self.split_file.format(split=split)
        if not split_path.is_file():
            raise DatasetError(f"{self.layout} root {self.root} has no {self.split_file.format(split=split)}; "
                               f"{where}")
        self.ids = [ln.strip() for ln in split_path.read_text().splitlines() if ln.strip()]
        if not self.ids:
            raise DatasetError(f"{self.layout} split file {split_path} lists no ids")
        self.files = [self._resolve(i) for i in self.ids]

    def _resolve(self, id_):
        files = {}
        for key, candidates in self.paths(id_).items():
            found = next((self.root / c for c in candidates if (self.root / c).is_file()), None)
            if found is None and key not in self.optional_maps:
                raise DatasetError(f"{self.layout} root {self.root}: missing {' or '.join(candidates)} "
                                   f"for id '{id_}' (map '{key}'); {len(self.ids)} ids in {self.split}")
            files[key] = found
        return files

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        arrays = self.load(self.ids[index], self.files[index])
        h, w = arrays["image"].shape[:2]
        sample = to_sample({k: v for k, v in arrays.items() if k == "image" or k in self.tasks})
        sample["meta"] = {"id": self.ids[index], "size": (int(h), int(w)), "dataset": self.name}
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self):
        return (f"{type(self).__name__}(root={self.root}, split={self.split}, n={len(self)}, "
                f"tasks={self.tasks})")
