"""Train SCA-MTL: `python -m model.train --config CONFIG [--fused] [--compile MODE] [--amp] [--resume] [...]`.

Single process, or one process per GPU/CPU under `torchrun` (DistributedDataParallel; NCCL on GPUs, gloo on
CPUs). The run directory holds config.yaml, log.csv / log.jsonl, TensorBoard events (tb/), PNG grids of
predictions vs labels (vis/) and checkpoints/{last,best}.pt, written atomically by rank 0 only.
`--resume` continues from checkpoints/last.pt with the same model, optimizer, schedule, step, data order and
RNG states: with num_workers 0 the losses equal those of an uninterrupted run.
Exit codes: 0 ok, 2 bad input, 3 non-finite loss.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import platform
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .compile import COMPILE_MODES, Stopwatch, compile_model
from .config import ConfigError, dump_config, load_config, supervised_tasks
from .data import DatasetError, collate, num_outputs
from .evaluate import (BAD_INPUT, autocast, build_split, device_for, evaluate_model, metrics_table, model_for,
                       progress, rank_and_world, scalar_metrics, task_loss, to_device, val_loader)
from .metrics import multi_task_gain
from .visualize import save_grid

NON_FINITE = 3


class NonFiniteLoss(RuntimeError):
    pass


class EpochSampler(DistributedSampler):
    """DistributedSampler (order from seed + epoch) that can start `skip` samples into the epoch."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip


def poly_schedule(cfg, steps_per_epoch):
    """lr factor (1 - progress)^power, progress counted in epochs (paper) or steps."""
    per_epoch = cfg["schedule_unit"] == "epoch"
    total = cfg["epochs"] if per_epoch else cfg["epochs"] * steps_per_epoch

    def factor(step):
        done = step // steps_per_epoch if per_epoch else step
        return max(0.0, 1.0 - done / total) ** cfg["poly_power"]
    return factor


def adam(params, **options) -> torch.optim.Adam:
    """Adam, in PyTorch's fused implementation where it has one for the parameters (float tensors on CPU or CUDA):
    the same update as the default per-parameter loop, several times faster (benchmarks/RESULTS.md)."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, fused=fused or None, **options)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup_distributed():
    """(rank, world, local_rank, device); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for(local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = rank_and_world()
    return rank, world, local_rank, device


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep the memory a training step frees for the next step (no block mapped on its own,
    no trimming of the heap) instead of handing it back to the OS: otherwise every CPU step faults fresh pages in
    for most of its activations again, which on a VM (several microseconds a page) can cost an eager step a third
    of its time. Process-wide and for good; the price is that the process keeps its peak heap. Returns whether it
    was applied (False off glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def wrap_model(net, cfg, device, world):
    """Move to `device`; under several processes: optional SyncBatchNorm, then DistributedDataParallel."""
    if world > 1 and cfg["sync_bn"]:
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            say("warning: sync_bn needs GPUs (PyTorch's SyncBatchNorm is CUDA-only); BatchNorm stays per process",
                dist.get_rank())
    net = net.to(device)
    if world > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def unwrap(net):
    return net.module if isinstance(net, DistributedDataParallel) else net


class RunLog:
    """Rank 0's records: log.csv (step, epoch, phase, name, value), log.jsonl (one record per event) and
    TensorBoard scalars. Other ranks get a RunLog that writes nothing."""

    def __init__(self, out, active):
        self.active = active
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter
        new = not (out / "log.csv").exists()
        self.csv_file = open(out / "log.csv", "a", newline="")
        self.csv = csv.writer(self.csv_file)
        if new:
            self.csv.writerow(["step", "epoch", "phase", "name", "value"])
        self.jsonl = open(out / "log.jsonl", "a")
        self.tb = SummaryWriter(str(out / "tb"))

    def write(self, step, epoch, phase, values: dict, **extra):
        if not self.active:
            return
        for k, v in values.items():
            self.csv.writerow([step, epoch, phase, k, f"{v:.8g}"])
            self.tb.add_scalar(f"{phase}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "epoch": epoch, "phase": phase, **values, **extra}) + "\n")
        self.csv_file.flush()
        self.jsonl.flush()

    def close(self):
        if self.active:
            self.csv_file.close()
            self.jsonl.close()
            self.tb.close()


def say(msg, rank=0):
    if rank == 0:
        print(msg, flush=True)


def run_dir(args, cfg, rank, world):
    """The run directory (rank 0 decides, the others receive it)."""
    if args.out:
        out = Path(args.out)
    elif args.resume:
        runs = sorted(Path("runs").glob(f"{cfg['name']}-*"), key=lambda p: p.stat().st_mtime)
        out = runs[-1] if runs else None
    else:
        out = Path("runs") / f"{cfg['name']}-{datetime.now():%Y%m%d-%H%M%S}"
    if world > 1:
        box = [str(out) if out else None]
        dist.broadcast_object_list(box, src=0)
        out = Path(box[0]) if box[0] else None
    return out


class Trainer:
    """The state of one training run and the steps that change it."""

    def __init__(self, cfg, args, out, rank, world, device):
        self.cfg, self.args, self.out, self.rank, self.world, self.device = cfg, args, out, rank, world, device
        self.num_outputs = num_outputs(cfg["dataset"], cfg["tasks"])
        self.train_set = build_split(cfg, cfg["train_split"], True, args.data_root)
        self.val_set = build_split(cfg, cfg["val_split"], False, args.data_root)
        self.sampler = EpochSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"],
                                    drop_last=True)
        self.steps_per_epoch = len(self.sampler) // cfg["batch_size"]
        if self.steps_per_epoch == 0:
            raise DatasetError(f"{len(self.sampler)} training images per process are fewer than one batch of "
                               f"{cfg['batch_size']}")
        seed_everything(cfg["seed"])      # identical initial weights on every rank (DDP also broadcasts them)
        self.net = wrap_model(model_for(cfg, args.fused or cfg["fused"]), cfg, device, world)
        self.compile_mode = args.compile or cfg["compile"]
        # what the steps call: self.net compiled (it, and its parameters, stay what checkpoints and the optimizer see)
        self.model = compile_model(self.net, self.compile_mode)
        self.opt = adam(self.net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, poly_schedule(cfg, self.steps_per_epoch))
        self.amp = args.amp or cfg["amp"]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and device.type == "cuda")
        self.loss_fn = task_loss(cfg, fused=unwrap(self.net).fused)
        self.step = self.epoch = self.position = 0
        self.best = None            # {"score", "step", "metrics"}
        self.last_eval_step = -1
        self.total_steps = cfg["epochs"] * self.steps_per_epoch
        max_steps = args.max_steps or cfg["max_steps"]
        self.stop_at = min(self.total_steps, max_steps) if max_steps else self.total_steps
        self.log = RunLog(out, rank == 0)
        seed_everything(cfg["seed"] + rank)  # augmentation streams differ per rank

    # checkpoints --------------------------------------------------------------------------------------
    def state(self, metrics=None):
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        return {"model": unwrap(self.net).state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "position": self.position, "rng": rngs,
                "world_size": self.world, "num_outputs": self.num_outputs, "config": self.cfg,
                "best": self.best, "metrics": metrics}

    def save(self, metrics=None, best=False):
        state = self.state(metrics)     # every rank takes part in gathering the RNG states
        if self.rank != 0:
            return
        ckpt_dir = self.out / "checkpoints"
        save_atomic(state, ckpt_dir / "last.pt")
        if best:
            save_atomic(state, ckpt_dir / "best.pt")

    def restore(self, path):
        ckpt = load_checkpoint(path, self.num_outputs, map_location=self.device)
        unwrap(self.net).load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
        self.best = ckpt["best"]
        if ckpt["world_size"] == self.world:
            set_rng_state(ckpt["rng"][self.rank])
        else:
            say(f"warning: checkpoint from {ckpt['world_size']} processes, now {self.world}: RNG streams reseeded",
                self.rank)
            seed_everything(self.cfg["seed"] + self.rank + self.step)
        say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.position})", self.rank)

    # evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, desc="eval"):
        tasks = supervised_tasks(self.cfg)

        def vis(batch, out):
            if self.rank == 0 and self.cfg["vis_samples"]:
                save_grid(self.out / "vis" / f"step_{self.step:07d}.png", batch, out, tasks, self.cfg["vis_samples"])

        loader = val_loader(self.cfg, self.val_set)
        with Stopwatch() as watch:
            result, loss, seconds = evaluate_model(self.model, loader, self.cfg, self.device, self.amp, vis, desc,
                                                   self.loss_fn)
        values = {"loss": loss, **scalar_metrics(result)}
        if watch.compile_s:
            values["compile_s"] = watch.compile_s
        score, key = -loss, "val loss"
        if self.cfg["baselines"]:
            values["Dm"] = score = multi_task_gain(result, self.cfg["baselines"], tasks)
            key = "Dm"
        self.log.write(self.step, self.epoch, "val", values, seconds=seconds)
        is_best = self.best is None or score > self.best["score"]
        if is_best:
            self.best = {"score": score, "by": key, "step": self.step, "metrics": result}
        self.last_eval_step = self.step
        self.save(result, best=is_best)
        say(f"step {self.step}: val loss {loss:.4f}" + (f", Dm {values['Dm']:+.2f} %" if "Dm" in values else "")
            + f" ({len(self.val_set)} images, {seconds:.1f} s)" + (" [best]" if is_best else ""), self.rank)
        return result

    def due_for_eval(self, epoch_end):
        every_steps, every_epochs = self.cfg["eval_every_steps"], self.cfg["eval_every"]
        if every_steps:
            return self.step % every_steps == 0
        return epoch_end and every_epochs and self.epoch % every_epochs == 0

    def _past(self, deadline):
        late = torch.tensor(float(time.perf_counter() > deadline))
        if self.world > 1:      # every rank stops at the same step
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return bool(late.item())

    # training -----------------------------------------------------------------------------------------
    def train_step(self, batch):
        batch = to_device(batch, self.device)
        with autocast(self.device, self.amp):
            out = self.model(batch["image"])
        out = {t: v.float() for t, v in out.items() if t != "deep_supervision"} | {
            "deep_supervision": {k: {t: p.float() for t, p in d.items()} for k, d in out["deep_supervision"].items()}}
        total, parts = self.loss_fn(out, batch)
        finite = torch.isfinite(total.detach()).float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            final = ", ".join(f"{t}={parts[t].item():.4g}" for t in self.cfg["tasks"])
            raise NonFiniteLoss(f"non-finite loss at step {self.step + 1} (epoch {self.epoch}): "
                                f"total={total.item():.4g}; per task: {final}; last good checkpoint: "
                                f"{self.out / 'checkpoints' / 'last.pt'}")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg["grad_clip"]:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg["grad_clip"])
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return total.detach(), {t: parts[t] for t in self.cfg["tasks"]}

    def loader(self):
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self.position * self.cfg["batch_size"]
        return DataLoader(self.train_set, batch_size=self.cfg["batch_size"], sampler=self.sampler, drop_last=True,
                          num_workers=self.cfg["num_workers"], collate_fn=collate,
                          generator=torch.Generator().manual_seed(self.cfg["seed"] * 100003 + self.epoch),
                          persistent_workers=False, pin_memory=self.device.type == "cuda")

    def fit(self):
        cfg, bs = self.cfg, self.cfg["batch_size"] * self.world
        self.net.train()
        bar = progress(self.stop_at * bs, "train", self.rank, initial=self.step * bs)
        sums, n_logged, tick = {}, 0, time.perf_counter()
        deadline = tick + self.args.time_limit if self.args.time_limit else None
        while self.step < self.stop_at:
            for batch in self.loader():
                with Stopwatch() as watch:
                    total, parts = self.train_step(batch)
                if watch.compile_s:  # the first step of a compiled network, or one that recompiled
                    self.log.write(self.step + 1, self.epoch, "compile", {"compile_s": watch.compile_s,
                                                                          "step_s": watch.seconds})
                    say(f"step {self.step + 1}: torch.compile ({self.compile_mode}) took {watch.compile_s:.1f} s of "
                        f"the step's {watch.seconds:.1f} s", self.rank)
                self.step += 1
                self.position += 1
                for k, v in {"loss": total, **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                n_logged += 1
                bar.update(bs)
                bar.set_postfix(step=self.step, loss=f"{total.item():.3f}")
                if self.step % cfg["log_every"] == 0 or self.step == self.stop_at:
                    seconds = time.perf_counter() - tick
                    values = {k: v / n_logged for k, v in sums.items()}
                    values["lr"] = self.opt.param_groups[0]["lr"]
                    values["img_per_s"] = n_logged * bs / max(seconds, 1e-9)
                    self.log.write(self.step, self.epoch, "train", values)
                    if not bar.disable:
                        bar.set_description(f"train loss {values['loss']:.3f}")
                    elif self.rank == 0:
                        say(f"step {self.step}/{self.stop_at} epoch {self.epoch}: loss {values['loss']:.4f} "
                            f"({values['img_per_s']:.1f} img/s)")
                    sums, n_logged, tick = {}, 0, time.perf_counter()
                if self.position == self.steps_per_epoch:
                    self.epoch, self.position = self.epoch + 1, 0
                    if self.due_for_eval(epoch_end=True):
                        self.evaluate()
                    else:
                        self.save()
                elif self.due_for_eval(epoch_end=False):
                    self.evaluate()
                if deadline is not None and self._past(deadline):
                    say(f"time limit of {self.args.time_limit:g} s reached at step {self.step}", self.rank)
                    self.stop_at = self.step
                if self.step >= self.stop_at:
                    break
        bar.close()
        result = self.evaluate("final eval") if self.last_eval_step != self.step else None
        self.log.close()
        return result


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="synthetic", help="a YAML path or a name in model/configs/ (default: synthetic)")
    p.add_argument("--data-root", help="override the config's data_root")
    p.add_argument("--fused", action="store_true", help="run the fused kernels path")
    p.add_argument("--compile", nargs="?", const="full", choices=COMPILE_MODES,
                   help="torch.compile the network: full (one graph, the default of a bare --compile) or regional "
                        "(one compiled module per repeated block); overrides the config's `compile`")
    p.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt "
                   "(OUT: --out, else the newest runs/<config>-*)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the lr schedule still spans the epochs)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop (evaluate, checkpoint) after this much training time")
    p.add_argument("--out", help="run directory (default runs/<config>-<timestamp>)")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="on CPU, let the C allocator hand freed memory back to the OS after every step (its default; "
                        "by default the trainer keeps it, see keep_freed_memory)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, _, device = setup_distributed()
    if device.type == "cpu" and not args.return_freed_memory:
        keep_freed_memory()
    try:
        cfg = load_config(args.config)
        out = run_dir(args, cfg, rank, world)
        if args.resume and (out is None or not (out / "checkpoints" / "last.pt").is_file()):
            raise CheckpointError(f"nothing to resume: no checkpoints/last.pt in {out or 'runs/' + cfg['name'] + '-*'}")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump_config(cfg))
        trainer = Trainer(cfg, args, out, rank, world, device)
        if args.resume:
            trainer.restore(out / "checkpoints" / "last.pt")
    except (ConfigError, DatasetError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    compiled = "" if trainer.compile_mode == "off" else f", compiled ({trainer.compile_mode})"
    say(f"run directory {out}\ntraining {cfg['name']}: {trainer.train_set!r}, {world} process(es) on {device}, "
        f"{'fused' if unwrap(trainer.net).fused else 'reference'} path{compiled}, steps {trainer.step}..{trainer.stop_at} "
        f"of {trainer.total_steps} ({trainer.steps_per_epoch} per epoch)", rank)
    try:
        result = trainer.fit()
    except NonFiniteLoss as e:
        trainer.log.close()
        print(f"error: {e}", file=sys.stderr)
        return NON_FINITE
    if result is not None:
        say(metrics_table({"final": result}), rank)
    return 0


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
