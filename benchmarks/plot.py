"""Plots and a markdown summary of the benchmark JSON files (bench_ops.py --json, bench_train.py --json).

    python -m benchmarks.plot --ops OPS.json --train TRAIN.json [MORE_TRAIN.json ...] --out DIR [--summary DIR/summary.md --steps STEPS.tsv]

PNGs written to DIR (each input optional; without matplotlib the plots are skipped with a note, the summary is not):
  ops_speedup.png   op-level speed-up over eager (eager f+b time / backend f+b time) per scale, one line per case and
                    backend, one panel per dataset, batch and dtype
  ops_memory.png    memory / eager per scale (GPU peak where measured, else bytes saved for backward), same layout
  train_ratios.png  training step: time and memory ratios fused / reference and compiled / reference per config
                    and dtype (whiskers on time: the lowest and highest round-by-round ratio)
The summary (markdown) holds the steps' exit codes (a tab-separated file of name, exit code, seconds), per training
config the fused/reference time and memory ratios in fp32 and bf16, and per op case the best backend's speed-up over
eager at each scale and its fraction of the device's copy bandwidth at the 1/4 scale (largest batch only).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

from benchmarks.labels import cpu_note

SCALE_NAMES = ("1/4", "1/8", "1/16", "1/32")


def load(path):
    """Rows of a JSON list file, [] when the path is unset, missing or unreadable (a failed benchmark step)."""
    if not path or not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"# cannot read {path}: {exc}")
        return []
    return rows if isinstance(rows, list) else []


def ok_rows(rows):
    return [r for r in rows if "error" not in r]


def series(row):
    """The line a row belongs to: 'ctam P=..' per pair count; CSAM's targets (J = 3, 2, 1) form one 'csam' line."""
    return "csam (J=3,2,1)" if row["op"] == "cross_scale" else row["case"]


def series_order(name):
    return (name.startswith("csam"), int(name.split("=")[1].split(",")[0].rstrip(")")))


def title_env(rows):
    r = rows[0]
    threads = f", {r['threads']} threads" if r.get("cpu_isa") and r.get("threads") else ""
    return f"{r.get('device_name')} ({r.get('device')}{threads}{cpu_note(r)}), torch {r.get('torch')}, " \
           f"triton {r.get('triton')}, commit {r.get('commit')}"


def memory_label(rows):
    return "GPU peak" if any("peak_mb" in r for r in rows) else "saved for backward"


def ops_groups(rows):
    """{(dataset, batch, dtype): rows} in a stable order."""
    groups = defaultdict(list)
    for r in ok_rows(rows):
        groups[(r["dataset"], r["batch"], r["dtype"])].append(r)
    return dict(sorted(groups.items()))


def plot_ops(plt, rows, out, field, ylabel, fname):
    groups = ops_groups(rows)
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.6 * len(groups)), squeeze=False)
    cases = sorted({series(r) for r in ok_rows(rows)}, key=series_order)
    backends = sorted({r["backend"] for r in ok_rows(rows)} - {"eager"})
    colors = {c: plt.cm.tab10(i % 10) for i, c in enumerate(cases)}
    styles = dict(zip(backends, [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]))
    for ax, ((dataset, batch, dtype), group) in zip(axes[:, 0], groups.items()):
        ticks = {}
        for r in group:
            ticks.setdefault(r["scale"], f"{SCALE_NAMES[r['scale']]}\n{r['hw'][0]}x{r['hw'][1]}, C={r['channels']}")
        for case in cases:
            for backend in backends:
                pts = sorted((r["scale"], r[field]) for r in group
                             if series(r) == case and r["backend"] == backend and r.get(field) is not None)
                if pts:
                    ls, marker = styles.get(backend, ("-", "x"))
                    ax.plot(*zip(*pts), ls, marker=marker, color=colors[case], label=f"{case}, {backend}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")
        plain = plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(sorted(ticks), [ticks[s] for s in sorted(ticks)])
        ax.set_xlabel("scale (positions, channels)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{dataset}, batch {batch}, {dtype}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{ylabel}\n{title_env(rows)}", fontsize=10)
    return save(fig, out, fname)


def train_ratio(row, kind):
    """The memory ratio of a training row: GPU peak (kind 'peak') or saved activations ('saved'), None if absent."""
    return row.get("peak_ratio") if kind == "peak" else row.get("saved_ratio")


def plot_train(plt, rows, out):
    rows = [r for r in ok_rows(rows) if r.get("variant") != "reference"]
    if not rows:
        return None
    groups = sorted({(r["config"], r["dtype"]) for r in rows})
    variants = sorted({r["variant"] for r in rows})
    mem_kinds = ["peak", "saved"] if any("peak_ratio" in r for r in rows) else ["saved"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(groups))
    series_t = [(v, None) for v in variants]
    series_m = [(v, k) for v in variants for k in mem_kinds]
    for ax, series, ylabel in ((ax_t, series_t, "step time / reference"),
                               (ax_m, series_m, "memory / reference")):
        width = 0.8 / len(series)
        for i, (variant, kind) in enumerate(series):
            vals, spread = [], [[], []]
            for g in groups:
                r = next((r for r in rows if (r["config"], r["dtype"]) == g and r["variant"] == variant), None)
                vals.append(float("nan") if r is None else (r["time_ratio"] if kind is None else train_ratio(r, kind))
                            or float("nan"))
                # time bars: whiskers from the lowest to the highest round-by-round ratio (the machine's noise)
                rounds = (r or {}).get("time_ratio_rounds") if kind is None else None
                spread[0].append(vals[-1] - min(rounds) if rounds else 0.0)
                spread[1].append(max(rounds) - vals[-1] if rounds else 0.0)
            bars = ax.bar([j + (i - (len(series) - 1) / 2) * width for j in x], vals, width,
                          label=variant + (f" ({kind})" if kind else ""), hatch="//" if kind == "saved" and
                          len(mem_kinds) > 1 else None, yerr=spread if kind is None else None, capsize=2,
                          error_kw={"elinewidth": 0.8})
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        sizes = {r["config"]: "x".join(map(str, r.get("size", []))) for r in rows}
        ax.set_xticks(list(x), [f"{c} {sizes[c]}\n{d}" for c, d in groups])
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel + " (lower is better)", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    r0 = rows[0]
    fig.suptitle(f"Training step, batch {r0.get('batch')}\n{title_env(rows)}", fontsize=10)
    return save(fig, out, "train_ratios.png")


def save(fig, out, fname):
    path = os.path.join(out, fname)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clf()
    print(f"# wrote {path}")
    return path


def make_plots(ops, train, out):
    """Paths of the PNGs written; [] with a printed note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: skipping the plots (the summary does not need it)")
        return []
    os.makedirs(out, exist_ok=True)
    paths = [plot_ops(plt, ops, out, "eager_over_this", "speed-up over eager (f+b)", "ops_speedup.png"),
             plot_ops(plt, ops, out, "mem_over_eager", f"memory / eager ({memory_label(ops)})", "ops_memory.png"),
             plot_train(plt, train, out)]
    plt.close("all")
    return [p for p in paths if p]


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def summary(ops, train, steps=()):
    """Markdown: steps' exit codes, training ratios per config and dtype, best op speed-ups per scale."""
    lines = ["# Benchmark summary", ""]
    env_rows = ops or train
    if env_rows:
        lines += [title_env(env_rows), ""]
    if steps:
        lines += ["| step | exit code | seconds |", "|---|---|---|"]
        lines += [f"| {name} | {rc} | {secs} |" for name, rc, secs in steps] + [""]
    train_ok = ok_rows(train)
    if train_ok:
        mem = "peak" if any("peak_ratio" in r for r in train_ok) else "saved"
        lines += [f"## Training step (ratio to reference; memory = {mem})", "",
                  f"| config | batch | size | variant | time fp32 | time bf16 | {mem} fp32 | {mem} bf16 |",
                  "|---|---|---|---|---|---|---|---|"]
        by = {(r["config"], r["variant"], r["dtype"]): r for r in train_ok}
        for config, variant in sorted({(c, v) for c, v, _ in by if v != "reference"}):
            fp32, bf16 = by.get((config, variant, "fp32"), {}), by.get((config, variant, "bf16-autocast"), {})
            any_row = fp32 or bf16
            lines.append(f"| {config} | {any_row.get('batch')} | {any_row.get('size')} | {variant} | "
                         f"{fmt(fp32.get('time_ratio'))} | {fmt(bf16.get('time_ratio'))} | "
                         f"{fmt(train_ratio(fp32, mem))} | {fmt(train_ratio(bf16, mem))} |")
        lines.append("")
    ops_ok = ok_rows(ops)
    if ops_ok:
        batch = max(r["batch"] for r in ops_ok)
        lines += [f"## Ops (batch {batch}, {ops_ok[0]['dtype']}): best backend's f+b speed-up over eager per scale; "
                  f"fraction of copy bandwidth ({ops_ok[0].get('device_gb_per_s', 0):.0f} GB/s) at 1/4", "",
                  "| data | case | " + " | ".join(SCALE_NAMES) + " | bw @1/4 |", "|---|---|" + "---|" * 5]
        best = {}
        for r in ops_ok:
            if r["batch"] == batch and r["backend"] != "eager" and r.get("eager_over_this") is not None:
                key = (r["dataset"], series(r), r["scale"])
                if key not in best or r["eager_over_this"] > best[key]["eager_over_this"]:
                    best[key] = r
        for dataset, case in sorted({k[:2] for k in best}, key=lambda k: (k[0], series_order(k[1]))):
            cells = [f"{best[(dataset, case, s)]['backend']} {best[(dataset, case, s)]['eager_over_this']:.2f}x"
                     if (dataset, case, s) in best else "-" for s in range(4)]
            top = best.get((dataset, case, 0))
            bw = f"{100 * top['bw_fraction']:.0f}% ({top['backend']})" if top and top.get("bw_fraction") else "-"
            lines.append(f"| {dataset} | {case} | " + " | ".join(cells) + f" | {bw} |")
        lines.append("")
    errors = [r for r in ops + train if "error" in r]
    if errors:
        lines += [f"{len(errors)} failed measurements:", ""]
        for r in errors[:10]:
            what = " ".join(str(r[k]) for k in ("dataset", "case", "scale", "backend", "batch", "config", "dtype",
                                                "variant") if k in r)
            lines.append(f"- {what}: {r['error']}")
        lines.append("")
    if not ops_ok and not train_ok:
        lines += ["No benchmark rows were produced.", ""]
    return "\n".join(lines)


def read_steps(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", help="bench_ops.py --json output")
    parser.add_argument("--train", nargs="+", default=[], help="bench_train.py --json outputs (rows concatenated)")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--summary", help="also write a markdown summary to this file (and print it)")
    parser.add_argument("--no-plots", action="store_true", help="only the summary")
    parser.add_argument("--steps", help="tab-separated step name, exit code, seconds (for the summary)")
    args = parser.parse_args(argv)
    ops, train = load(args.ops), [row for path in args.train for row in load(path)]
    paths = [] if args.no_plots else make_plots(ops, train, args.out)
    if args.summary:
        text = summary(ops, train, read_steps(args.steps))
        with open(args.summary, "w") as f:
            f.write(text)
        print(text)
    return paths


if __name__ == "__main__":
    main()
