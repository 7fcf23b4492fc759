"""`make demo` until training lands: one forward/backward of SCA-MTL on random input, with shapes, parameter
counts per part and the time of one training step."""
from __future__ import annotations

import argparse
import time

import torch

from . import NYUD_TASKS, build_model, parameter_counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tasks = {"semseg": NYUD_TASKS["semseg"], "depth": NYUD_TASKS["depth"]}
    net = build_model(tasks).train()
    print("parameters (NYUD semseg+depth):")
    for part, n in parameter_counts(net).items():
        print(f"  {part:<15} {n / 1e6:8.3f} M")
    x = torch.randn(args.batch, 3, *args.size)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    times = []
    for step in range(3):
        start = time.perf_counter()
        out = net(x)
        loss = sum(out[t].square().mean() for t in tasks)
        loss = loss + sum(p.square().mean() for d in out["deep_supervision"].values() for p in d.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        print(f"step {step}: {times[-1]:.2f} s")
    for t in tasks:
        print(f"output {t}: {tuple(out[t].shape)}")
    print(f"training step, batch {args.batch} at {args.size[0]}x{args.size[1]}, {torch.get_num_threads()} threads: "
          f"median {sorted(times)[1]:.2f} s")


if __name__ == "__main__":
    main()
