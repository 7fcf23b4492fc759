"""`python -m model.summary`: parameter counts per part of SCA-MTL and the time of a few training steps on
random input, reference and fused paths side by side."""
from __future__ import annotations

import argparse
import time

import torch

from . import TASK_SETS as CONFIGS
from . import build_model, parameter_counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"))
    parser.add_argument("--config", choices=sorted(CONFIGS), default="nyud2")
    args = parser.parse_args(argv)
    for name in CONFIGS:
        tasks = CONFIGS[name]
        torch.manual_seed(0)
        net = build_model(tasks)
        print(f"parameters ({name}: {', '.join(tasks)}):")
        for part, n in parameter_counts(net).items():
            print(f"  {part:<15} {n / 1e6:8.3f} M")
    tasks = CONFIGS[args.config]
    torch.manual_seed(0)
    net = build_model(tasks).train()
    x = torch.randn(args.batch, 3, *args.size)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    for fused in (False, True):
        net.set_fused(fused)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = net(x)
            loss = sum(out[t].square().mean() for t in tasks)
            loss = loss + sum(p.square().mean() for d in out["deep_supervision"].values() for p in d.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        print(f"{'fused' if fused else 'reference'} training step ({args.config}), batch {args.batch} at "
              f"{args.size[0]}x{args.size[1]}, {torch.get_num_threads()} threads: median {sorted(times)[1]:.2f} s")
    for t in tasks:
        print(f"output {t}: {tuple(out[t].shape)}")


if __name__ == "__main__":
    main()
