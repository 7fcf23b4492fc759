"""`make demo`: train the FUSED SCA-MTL on the synthetic default for a few minutes, then compare its
validation metrics with those of the same network untrained.

Runs `python -m model.train --config synthetic --fused --time-limit SECONDS`, evaluates the untrained
weights (the trainer's initialisation: same seed) on the same validation scenes, prints a before/after
table per task, the training loss at the start and the end, and the run directory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from . import train
from .checkpoint import load_checkpoint
from .config import load_config
from .evaluate import build_split, device_for, evaluate_model, metrics_table, model_for, val_loader
from .metrics import PRIMARY


def first_and_last_losses(out):
    """Mean training loss of the first and of the last logged interval (log_every steps each)."""
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["phase"] == "train"]
    return losses[0], losses[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="synthetic")
    p.add_argument("--minutes", type=float, default=3.0, help="training time (default 3)")
    p.add_argument("--out", help="run directory (default runs/demo-<timestamp>)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    cfg = load_config(args.config)
    out = Path(args.out or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    device = device_for()

    train.seed_everything(cfg["seed"])          # the trainer's initial weights
    untrained = model_for(cfg, fused=True).to(device)
    val = val_loader(cfg, build_split(cfg, cfg["val_split"], False))
    print(f"evaluating the untrained fused network on {len(val.dataset)} validation scenes ...", flush=True)
    before, before_loss, _ = evaluate_model(untrained, val, cfg, device)

    code = train.main(["--config", args.config, "--fused", "--out", str(out), "--time-limit",
                       str(args.minutes * 60)])
    if code:
        return code
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    after = ckpt["metrics"]
    first, last = first_and_last_losses(out)
    print(f"\nbefore vs after {ckpt['step']} training steps (fused path, {cfg['size'][0]}x{cfg['size'][1]}, "
          f"batch {cfg['batch_size']}, {torch.get_num_threads()} threads):")
    print(metrics_table({"untrained": before, "trained": after}))
    print("primary metric change: " + ", ".join(
        f"{t} {PRIMARY[t][0]} {before[t][PRIMARY[t][0]]:.2f} -> {after[t][PRIMARY[t][0]]:.2f}" for t in after))
    print(f"training loss: first logged interval {first:.3f}, last {last:.3f} "
          f"({100 * (last - first) / first:+.1f} %); untrained validation loss {before_loss:.3f}")
    print(f"run directory: {out} (config.yaml, log.csv, log.jsonl, tb/, vis/, checkpoints/)")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
