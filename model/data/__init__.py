"""Data sets of the project: the embedded synthetic scenes (default), NYUD-v2 and PASCAL-Context.

`build_dataset(name, root, split, tasks, size, augment)` returns a torch Dataset of samples: "image"
float [3,H,W] ImageNet-normalised; per task "semseg"/"human_parts" long [H,W] (255 = ignore), "depth"
float [1,H,W] (0 = invalid), "normals" float [3,H,W] (all-zero = invalid), "edge"/"sal" float [1,H,W] in
{0,1}; "meta" {"id", "size" (original H, W), "dataset"}. Batch them with `collate`.
"""
from .base import DatasetError, collate
from .nyud import NYUD
from .pascal import PASCALContext
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import SyntheticScenes, render_scene
from .transforms import AUGMENT, build_transforms

DATASETS = {"synthetic": SyntheticScenes, "nyud": NYUD, "pascal": PASCALContext}
NUM_OUTPUTS = {
    "nyud": {"semseg": 40, "depth": 1, "normals": 3, "edge": 1},
    "pascal": {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1},
    "synthetic": {"semseg": len(SYNTHETIC_CLASSES), "depth": 1, "normals": 3, "edge": 1, "human_parts": 7,
                  "sal": 1},
}
# training sizes of the paper configs; synthetic scenes render at any size
DEFAULT_SIZE = {"nyud": (480, 640), "pascal": (512, 512), "synthetic": (256, 256)}
# edge-loss positive weight (MTI-Net: 0.95 PASCAL; NYUD 0.8 or 0.95, a config value)
EDGE_POS_WEIGHT = {"nyud": 0.95, "pascal": 0.95, "synthetic": 0.95}

__all__ = ["build_dataset", "num_outputs", "collate", "DatasetError", "DATASETS", "NUM_OUTPUTS",
           "DEFAULT_SIZE", "EDGE_POS_WEIGHT", "SyntheticScenes", "NYUD", "PASCALContext", "render_scene",
           "build_transforms"]


def _check_name(name):
    if name not in DATASETS:
        raise DatasetError(f"unknown data set '{name}'; expected one of {', '.join(DATASETS)}")


def num_outputs(name, tasks=None):
    """{task: output channels} for data set `name` (all its tasks when `tasks` is None)."""
    _check_name(name)
    table = NUM_OUTPUTS[name]
    tasks = tuple(table) if tasks is None else tuple(tasks)
    unknown = [t for t in tasks if t not in table]
    if unknown:
        raise DatasetError(f"unknown task(s) {unknown} for data set '{name}'; available: {', '.join(table)}")
    return {t: table[t] for t in tasks}


def build_dataset(name="synthetic", root=None, split="train", tasks=None, size=None, augment=False, **kwargs):
    """A data set with its transforms: resize to `size` (default: the paper's training size), random
    flip/zoom/rotation of that data set's MTI-Net config when `augment`, ImageNet normalisation.

    `root` is the NYUD_MT / PASCAL_MT directory (unused for "synthetic"); `tasks` None = all tasks of the
    data set; extra `kwargs` go to the data set (synthetic: seed, length, cache) or override the
    augmentation (scales, rotate, flip)."""
    _check_name(name)
    size = DEFAULT_SIZE[name] if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    aug = dict(AUGMENT[name])
    for k in ("scales", "rotate", "flip"):
        if k in kwargs:
            aug[k] = kwargs.pop(k)
    transform = build_transforms(size, augment, **aug)
    if name == "synthetic":
        return SyntheticScenes(split=split, tasks=tasks, size=size, transform=transform, **kwargs)
    if kwargs:
        raise DatasetError(f"unexpected options {sorted(kwargs)} for data set '{name}'")
    return DATASETS[name](root, split=split, tasks=tasks, transform=transform)
