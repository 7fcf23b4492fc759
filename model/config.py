"""Training configs: YAML files in model/configs/, defaults, inheritance (`base:`) and validation.

A config is one flat mapping; every key is listed in DEFAULTS with its default. `load_config(name_or_path)`
reads a file (a path, or the name of a file in model/configs/ with or without ".yaml"), merges it over its
`base` (another config, resolved the same way) and over DEFAULTS, and checks every value. Unknown keys and
bad values raise ConfigError with a one-line message.
"""
from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"

DEFAULTS = {
    # data
    "dataset": "synthetic",          # synthetic | nyud | pascal
    "data_root": None,               # NYUD_MT / PASCAL_MT directory (unused for synthetic)
    "tasks": ["semseg", "depth", "normals", "edge"],
    "size": None,                    # [H, W] or one int; None = the data set's paper size
    "augment": True,
    "train_split": "train",
    "val_split": "val",
    "dataset_options": {},           # extra keyword arguments of the data set (synthetic: seed, length, cache)
    "val_dataset_options": {},       # the same for the validation set (merged over dataset_options)
    "num_workers": 2,
    # model
    "widths": [36, 72, 144, 288],
    "pretrained": False,             # False or the path of hrnet_w18_small_v2 weights
    "fused": False,
    "backend": "auto",               # attention kernels of the fused path
    "compile": "off",                # torch.compile: off | full (one graph) | regional (one per repeated block)
    "sync_bn": False,                # SyncBatchNorm under DistributedDataParallel
    # loss
    "loss_weights": {},              # {task: weight}; missing tasks weigh 1; weight 0 = not supervised
    "edge_pos_weight": None,         # None = the data set's default
    # optimisation
    "batch_size": 8,                 # per process
    "val_batch_size": 8,
    "epochs": 100,
    "max_steps": None,               # stop early; the lr schedule still spans `epochs`
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "poly_power": 0.9,
    "schedule_unit": "epoch",        # poly decay per epoch (paper) or per step
    "grad_clip": None,
    "amp": False,                    # autocast: float16 + GradScaler on CUDA, bfloat16 on CPU
    "seed": 0,
    # bookkeeping
    "log_every": 20,                 # steps between training log rows
    "eval_every": 1,                 # epochs between evaluations (0 = only at the end)
    "eval_every_steps": None,        # or steps between evaluations (overrides eval_every)
    "vis_samples": 4,                # images in the PNG grid of each evaluation
    "baselines": None,               # JSON of single-task results: enables Dm and selects "best" by it
}

CHOICES = {"dataset": ("synthetic", "nyud", "pascal"), "schedule_unit": ("epoch", "step"),
           "compile": ("off", "full", "regional")}
POSITIVE_INTS = ("batch_size", "val_batch_size", "epochs", "log_every", "max_steps", "eval_every_steps")
NON_NEGATIVE_INTS = ("num_workers", "eval_every", "vis_samples", "seed")
NUMBERS = ("lr", "weight_decay", "poly_power", "grad_clip", "edge_pos_weight")
BOOLS = ("augment", "fused", "sync_bn", "amp")


class ConfigError(ValueError):
    """A config file or value is wrong; the message is one line."""


def config_path(name_or_path) -> Path:
    """A config file from a path, or from a name in model/configs/ (".yaml" optional)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.parent == Path("."):
        for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
            if candidate.is_file():
                return candidate
    names = ", ".join(available_configs())
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a name in {CONFIG_DIR} (have: {names})")


def available_configs() -> list:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read(path: Path, seen=()) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    sibling = path.parent / str(base)
    base_path = sibling if sibling.is_file() else config_path(base)
    if base_path.resolve() in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to {base_path}")
    merged = _read(base_path, seen + (path.resolve(),))
    merged.update(raw)
    return merged


def load_config(name_or_path, overrides: dict | None = None) -> dict:
    """The resolved, validated config of a file (plus `overrides`, e.g. from the command line)."""
    path = config_path(name_or_path)
    values = _read(path)
    values.update(overrides or {})
    cfg = validate({**DEFAULTS, **values}, source=str(path))
    cfg["name"] = path.stem
    return cfg


def _fail(source, msg):
    raise ConfigError(f"{source}: {msg}")


def validate(cfg: dict, source="config") -> dict:
    """Check keys and values; return the config with normalised types (tuples, tasks as a list)."""
    cfg = dict(cfg)
    cfg.pop("name", None)
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        _fail(source, f"unknown key(s) {unknown}; allowed keys: {', '.join(DEFAULTS)} (and 'base')")
    _check_scalars(cfg, source)
    _check_tasks_and_weights(cfg, source)
    _check_shapes(cfg, source)
    for k in ("dataset_options", "val_dataset_options"):
        if not isinstance(cfg[k], dict):
            _fail(source, f"{k} must be a mapping, got {cfg[k]!r}")
    if cfg["dataset"] != "synthetic" and (cfg["dataset_options"] or cfg["val_dataset_options"]):
        _fail(source, f"dataset_options are only for the synthetic data set, not '{cfg['dataset']}'")
    return cfg


def _check_scalars(cfg: dict, source) -> None:
    """Choices, integers, numbers (made float) and booleans, in place."""
    if isinstance(cfg["compile"], bool):  # YAML reads `compile: off` as false
        cfg["compile"] = "full" if cfg["compile"] else "off"
    for k, allowed in CHOICES.items():
        if cfg[k] not in allowed:
            _fail(source, f"{k} must be one of {list(allowed)}, got {cfg[k]!r}")
    for k in POSITIVE_INTS + NON_NEGATIVE_INTS:
        v = cfg[k]
        if v is None and k in ("max_steps", "eval_every_steps"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k in POSITIVE_INTS else 0):
            kind = "a positive" if k in POSITIVE_INTS else "a non-negative"
            _fail(source, f"{k} must be {kind} integer, got {v!r}")
    for k in NUMBERS:
        v = cfg[k]
        if v is None and k in ("grad_clip", "edge_pos_weight"):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            _fail(source, f"{k} must be a non-negative number, got {v!r}")
        cfg[k] = float(v)
    for k in BOOLS:
        if not isinstance(cfg[k], bool):
            _fail(source, f"{k} must be true or false, got {cfg[k]!r}")


def _check_tasks_and_weights(cfg: dict, source) -> None:
    """The task list against the data set, and one non-negative loss weight per task (default 1), in place."""
    from .data import DatasetError, num_outputs
    tasks = cfg["tasks"]
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks:
        _fail(source, f"tasks must be a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        _fail(source, f"tasks lists a task twice: {list(tasks)}")
    try:
        num_outputs(cfg["dataset"], tasks)
    except DatasetError as e:
        _fail(source, str(e))
    if len(tasks) < 2:
        _fail(source, f"SCA-MTL needs at least 2 tasks (cross-task attention), got {list(tasks)}; for a "
                      f"single-task baseline add a second task with loss weight 0 (see *_only.yaml)")
    cfg["tasks"] = list(tasks)

    weights = cfg["loss_weights"] or {}
    if not isinstance(weights, dict):
        _fail(source, f"loss_weights must map task names to numbers, got {weights!r}")
    extra = sorted(set(weights) - set(tasks))
    if extra:
        _fail(source, f"loss_weights names task(s) {extra} that are not in tasks {list(tasks)}")
    for t, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            _fail(source, f"loss_weights[{t}] must be a non-negative number, got {w!r}")
    cfg["loss_weights"] = {t: float(weights.get(t, 1.0)) for t in tasks}
    if not any(cfg["loss_weights"].values()):
        _fail(source, "every task has loss weight 0; nothing would be trained")


def _check_shapes(cfg: dict, source) -> None:
    """The input size ([H, W], an int means square) and the decoder widths, made lists, in place."""
    size = cfg["size"]
    if size is not None:
        size = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 32 for s in size)):
            _fail(source, f"size must be an int or [H, W] of ints >= 32, got {cfg['size']!r}")
        cfg["size"] = list(size)
    widths = cfg["widths"]
    if not isinstance(widths, (list, tuple)) or len(widths) != 4:
        _fail(source, f"widths must be a list of 4 ints, got {widths!r}")
    try:
        from .network import check_widths
        check_widths(widths, len(cfg["tasks"]))
    except ValueError as e:
        _fail(source, str(e))
    cfg["widths"] = list(widths)


def supervised_tasks(cfg) -> list:
    """Tasks with a non-zero loss weight: the ones that are evaluated."""
    return [t for t in cfg["tasks"] if cfg["loss_weights"][t] > 0]


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
