"""Evaluate a checkpoint on a validation split: `python -m model.evaluate --config CONFIG --checkpoint FILE`
(ours) or `--authors-checkpoint FILE` (the authors' best_model.pth.tar / checkpoint.pth.tar, model/authors.py).

Also the evaluation loop and the pieces that training shares with it: data loaders, devices, autocast,
progress bars, the metrics table. Exit codes: 0 ok, 2 bad input (config, data set, checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .authors import AuthorsCheckpointError, load_authors_checkpoint
from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, load_config, supervised_tasks
from .data import EDGE_POS_WEIGHT, DatasetError, build_dataset, collate, num_outputs
from .losses import MultiTaskLoss
from .metrics import PRIMARY, MultiTaskMetrics, multi_task_gain
from .network import build_model

BAD_INPUT = 2


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def progress(total, desc, rank=0, initial=0):
    """A tqdm bar counting images (so its rate reads img/s); off when stderr is not a TTY or rank != 0."""
    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True, leave=False,
                disable=rank != 0 or not sys.stderr.isatty())


def autocast(device, enabled):
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def build_split(cfg, split, train, data_root=None):
    """The data set of `split` as the config describes it (augmentation only for training)."""
    options = dict(cfg["dataset_options"])
    if not train:
        options.update(cfg["val_dataset_options"])
    return build_dataset(cfg["dataset"], data_root or cfg["data_root"], split, cfg["tasks"], cfg["size"],
                         augment=train and cfg["augment"], **options)


class ShardSampler(Sampler):
    """Indices rank, rank + world, ...: every sample evaluated exactly once over all processes."""

    def __init__(self, n, rank=0, world=1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def val_loader(cfg, dataset):
    rank, world = rank_and_world()
    # a fixed generator: creating the iterator must not draw from the global RNG (resume reproducibility)
    return DataLoader(dataset, batch_size=cfg["val_batch_size"], sampler=ShardSampler(len(dataset), rank, world),
                      num_workers=cfg["num_workers"], collate_fn=collate, generator=torch.Generator().manual_seed(0))


def task_loss(cfg, fused=False):
    """The configured multi-task loss; `fused`: on the fused path (the same function, for a fused network)."""
    edge = cfg["edge_pos_weight"]
    return MultiTaskLoss(cfg["tasks"], cfg["loss_weights"],
                         EDGE_POS_WEIGHT[cfg["dataset"]] if edge is None else edge, fused=fused)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_model(net, loader, cfg, device, amp=False, vis=None, desc="eval", loss_fn=None):
    """Pooled metrics of the supervised tasks over the loader (synced over processes) and the mean
    validation loss (`loss_fn`, default the configured reference loss). `vis(batch, output)` is called with the
    first batch (for the PNG grid)."""
    rank, world = rank_and_world()
    tasks = supervised_tasks(cfg)
    metrics = MultiTaskMetrics(num_outputs(cfg["dataset"], tasks), cfg["dataset"])
    loss_fn = task_loss(cfg) if loss_fn is None else loss_fn
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    bar = progress(len(loader.sampler) * world, desc, rank)
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        batch = to_device(batch, device)
        with autocast(device, amp):
            out = net(batch["image"])
        out = {t: v.float() for t, v in out.items() if t != "deep_supervision"}
        total, _ = loss_fn(out, batch)
        n = batch["image"].shape[0]
        loss_sum += torch.tensor([float(total) * n, n], dtype=torch.float64, device=device)
        metrics.update(out, batch)
        if i == 0 and vis is not None:
            vis(batch, out)
        bar.update(n * world)
    bar.close()
    if world > 1:
        metrics.sync(device if device.type == "cuda" else None)
        dist.all_reduce(loss_sum)
    net.train(was_training)
    result = metrics.compute()
    seconds = time.perf_counter() - start
    return result, (loss_sum[0] / loss_sum[1].clamp(min=1)).item(), seconds


def scalar_metrics(result):
    """{"task/metric": value} of the scalar entries of MultiTaskMetrics.compute()."""
    return {f"{t}/{k}": v for t, ms in result.items() for k, v in ms.items() if isinstance(v, (int, float))}


def metrics_table(columns: dict) -> str:
    """A text table of the primary metric (and a few others) per task; `columns` = {title: result}."""
    titles = list(columns)
    first = columns[titles[0]]
    rows = []
    for t in first:
        key, lower = PRIMARY[t]
        extra = ("log_rmse", "median", "mIoU", "maxF_atrc", "pixel_acc")   # sal: MTI-Net mIoU, ATRC maxF
        keys = [key] + [k for k in extra if k in first[t] and k != key]
        for k in keys:
            label = f"{t} {k}" + (" (lower better)" if k == key and lower else "")
            rows.append([label] + [_fmt(columns[c][t].get(k)) for c in titles])
    width = max(len(r[0]) for r in rows) + 2
    lines = ["".ljust(width) + "".join(c.rjust(14) for c in titles)]
    lines += [r[0].ljust(width) + "".join(v.rjust(14) for v in r[1:]) for r in rows]
    return "\n".join(lines)


def _fmt(v):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def device_for(local_rank=0):
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def model_for(cfg, fused=None):
    net = build_model(num_outputs(cfg["dataset"], cfg["tasks"]), pretrained=cfg["pretrained"],
                      widths=tuple(cfg["widths"]))
    return net.set_fused(cfg["fused"] if fused is None else fused, cfg["backend"])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a YAML path or a name in model/configs/")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint of python -m model.train")
    which.add_argument("--authors-checkpoint", metavar="FILE",
                       help="the authors' released best_model.pth.tar or checkpoint.pth.tar (same task set)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read an authors' file that holds more than tensors (only for a file you trust)")
    p.add_argument("--fused", action="store_true", help="run the fused kernels path")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--data-root", help="override the config's data_root")
    p.add_argument("--split", help="override the config's val_split")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        net = model_for(cfg, fused=args.fused or cfg["fused"])
        if args.authors_checkpoint:
            load_authors_checkpoint(net, args.authors_checkpoint, args.allow_pickle)
            source = f"the authors' {args.authors_checkpoint}"
        else:
            ckpt = load_checkpoint(args.checkpoint, num_outputs(cfg["dataset"], cfg["tasks"]))
            net.load_state_dict(ckpt["model"])
            source = f"{args.checkpoint} (step {ckpt.get('step')})"
        dataset = build_split(cfg, args.split or cfg["val_split"], False, args.data_root)
    except (ConfigError, DatasetError, CheckpointError, AuthorsCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    device = device_for()
    net = net.to(device)
    print(f"evaluating {source} on {dataset!r}, {'fused' if net.fused else 'reference'} path, {device}")
    result, loss, seconds = evaluate_model(net, val_loader(cfg, dataset), cfg, device, args.amp,
                                           loss_fn=task_loss(cfg, fused=net.fused))
    print(metrics_table({"metrics": result}))
    print(f"validation loss {loss:.4f}; {len(dataset)} images in {seconds:.1f} s "
          f"({len(dataset) / max(seconds, 1e-9):.1f} img/s)")
    if cfg["baselines"]:
        print(f"multi-task gain Dm = {multi_task_gain(result, cfg['baselines']):+.2f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": str(args.checkpoint or args.authors_checkpoint), "loss": loss, "metrics": result},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
