"""model.train / model.evaluate through their main(): run directory contents, resume equality, the
non-finite-loss stop, atomic checkpoints, bad inputs, and 2-process DDP with gloo."""
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model import compile as model_compile
from model import evaluate, train
from model.authors import authors_state_dict
from model.checkpoint import load_checkpoint, save_atomic

TINY = """base: synthetic
tasks: [semseg, depth]
size: [32, 32]
widths: [12, 24, 48, 96]
dataset_options: {length: 8, cache: true}
val_dataset_options: {length: 4}
augment: true
num_workers: 0
batch_size: 2
val_batch_size: 4
epochs: 2
log_every: 1
eval_every: 0
vis_samples: 2
"""


def tiny_config(tmp_path, extra="", name="tiny"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(TINY + extra)
    return str(p)


def train_losses(out):
    rows = [json.loads(ln) for ln in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["phase"] == "train"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """4 uninterrupted steps (one epoch: 4 batches of 2)."""
    tmp = tmp_path_factory.mktemp("full")
    cfg = tiny_config(tmp)
    assert train.main(["--config", cfg, "--out", str(tmp / "run"), "--max-steps", "4"]) == 0
    return cfg, tmp / "run"


def test_run_directory_holds_config_logs_events_grids_and_checkpoints(full_run):
    _, out = full_run
    assert (out / "config.yaml").read_text().startswith("dataset: synthetic")
    assert (out / "log.csv").read_text().splitlines()[0] == "step,epoch,phase,name,value"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert list((out / "vis").glob("step_*.png"))
    last = load_checkpoint(out / "checkpoints" / "last.pt", {"semseg": 7, "depth": 1})
    assert last["step"] == 4 and (last["epoch"], last["position"]) == (1, 0)
    assert (out / "checkpoints" / "best.pt").is_file()
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert sorted(train_losses(out)) == [1, 2, 3, 4]


def test_compiled_fused_run_logs_its_compile_time_and_trains_as_eager(full_run, tmp_path, monkeypatch):
    """--fused --compile regional: the losses of the eager fused run, and the compile time in the log. AOTAutograd
    with eager kernels stands in for Inductor, whose code generation takes many minutes on 2 cores."""
    monkeypatch.setattr(model_compile, "DEFAULT_BACKEND", "aot_eager")
    cfg, _ = full_run
    runs = {mode: tmp_path / mode for mode in ("off", "regional")}
    for mode, out in runs.items():
        assert train.main(["--config", cfg, "--out", str(out), "--max-steps", "2", "--fused", "--compile", mode]) == 0
    out = runs["regional"]
    got, want = train_losses(out), train_losses(runs["off"])
    assert got[1] == pytest.approx(want[1], rel=1e-6)
    # Adam's first update is about lr * sign(grad): the float32 rounding of gradients that are zero in exact
    # arithmetic (a conv bias before BatchNorm) decides the sign, so step 2 agrees less, by an amount that depends on
    # the processor's rounding: 1.2e-3 relative on an AVX-512 Xeon, under 1e-3 on an AVX2 EPYC (tests/test_compile.py
    # checks the gradients themselves in float64)
    assert got[2] == pytest.approx(want[2], rel=5e-3)
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    compiles = [r for r in rows if r["phase"] == "compile"]
    assert compiles and compiles[0]["step"] == 1 and 0 < compiles[0]["compile_s"] <= compiles[0]["step_s"]
    assert any("compile_s" in r for r in rows if r["phase"] == "val")  # eval mode compiles its own graphs


def test_evaluate_cli_reads_the_checkpoint(full_run, tmp_path, capsys):
    cfg, out = full_run
    js = tmp_path / "m.json"
    assert evaluate.main(["--config", cfg, "--checkpoint", str(out / "checkpoints" / "last.pt"),
                          "--json", str(js)]) == 0
    result = json.loads(js.read_text())["metrics"]
    assert set(result) == {"semseg", "depth"} and 0 <= result["semseg"]["mIoU"] <= 100
    assert "semseg mIoU" in capsys.readouterr().out


def test_evaluate_cli_reads_an_authors_checkpoint(full_run, tmp_path):
    """The same weights written in the authors' layout evaluate to the same metrics as our checkpoint."""
    cfg, out = full_run
    net = evaluate.model_for(evaluate.load_config(cfg))
    net.load_state_dict(load_checkpoint(out / "checkpoints" / "last.pt")["model"])
    torch.save(authors_state_dict(net), tmp_path / "best_model.pth.tar")
    metrics = []
    for argv in (["--checkpoint", str(out / "checkpoints" / "last.pt")],
                 ["--authors-checkpoint", str(tmp_path / "best_model.pth.tar")]):
        assert evaluate.main(["--config", cfg, "--json", str(tmp_path / "m.json")] + argv) == 0
        metrics.append(json.loads((tmp_path / "m.json").read_text())["metrics"])
    assert metrics[0] == metrics[1]


def test_resume_gives_the_losses_of_an_uninterrupted_run(full_run, tmp_path):
    cfg, full = full_run
    out = str(tmp_path / "run")
    assert train.main(["--config", cfg, "--out", out, "--max-steps", "1"]) == 0     # stops mid-epoch
    assert train.main(["--config", cfg, "--out", out, "--max-steps", "4", "--resume"]) == 0
    want, got = train_losses(full), train_losses(out)
    assert sorted(got) == sorted(want)
    bad = {s: (want[s], got[s]) for s in want if abs(want[s] - got[s]) > 1e-5 * max(1.0, abs(want[s]))}
    assert not bad, f"step: (uninterrupted, resumed) losses differ: {bad}"


def test_non_finite_loss_stops_with_step_and_task_losses_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    real = train.task_loss
    calls = {"n": 0}

    def poisoned(cfg, **options):
        fn = real(cfg, **options)

        def forward(output, batch):  # the trainer's loss, also its evaluations' (no grad): poison training step 2
            total, parts = fn(output, batch)
            calls["n"] += torch.is_grad_enabled()
            if calls["n"] == 2 and torch.is_grad_enabled():
                parts = dict(parts, depth=torch.tensor(float("nan")))
                total = total * float("nan")
            return total, parts
        return forward

    monkeypatch.setattr(train, "task_loss", poisoned)
    out = tmp_path / "run"
    code = train.main(["--config", tiny_config(tmp_path, "eval_every_steps: 1\n"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == train.NON_FINITE
    assert "non-finite loss at step 2" in err and "depth=nan" in err and "semseg=" in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 1


def test_crash_while_writing_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.ones(3)}, "num_outputs": {}}, path)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"model": {"w": torch.zeros(3)}, "num_outputs": {}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_bad_inputs_exit_2_with_one_line_messages(full_run, tmp_path, capsys):
    cfg, out = full_run
    cases = [
        (train.main, ["--config", "nyud_semseg_depth", "--data-root", str(tmp_path / "missing")], "does not exist"),
        (train.main, ["--config", tiny_config(tmp_path, "colour: red\n", "colour")], "unknown key(s) ['colour']"),
        (train.main, ["--config", tiny_config(tmp_path, "tasks: [semseg, flow]\n", "flow")], "flow"),
        (train.main, ["--config", tiny_config(tmp_path, "compile: fast\n", "fast")],
         "compile must be one of ['off', 'full', 'regional'], got 'fast'"),
        (train.main, ["--config", cfg, "--out", str(tmp_path / "empty"), "--resume"], "nothing to resume"),
        (evaluate.main, ["--config", "synthetic", "--checkpoint", str(out / "checkpoints" / "last.pt")],
         "was trained for tasks {semseg: 7, depth: 1}, config asks for {semseg: 7, depth: 1, normals: 3, edge: 1}"),
        (evaluate.main, ["--config", cfg, "--checkpoint", str(tmp_path / "none.pt")], "does not exist"),
        (evaluate.main, ["--config", cfg, "--authors-checkpoint", str(tmp_path / "none.pth.tar")], "does not exist"),
        (evaluate.main, ["--config", cfg, "--authors-checkpoint", str(tmp_path / "sal.pth.tar")],
         "the checkpoint's heads are for tasks ['sal'], the network's for ['semseg', 'depth']"),
    ]
    torch.save({"module.heads.sal.last_layer.3.bias": torch.zeros(1)}, tmp_path / "sal.pth.tar")
    (tmp_path / "nyud").mkdir()
    cases.append((train.main, ["--config", "nyud_semseg_depth", "--data-root", str(tmp_path / "nyud")],
                  "gt_sets/train.txt"))
    for fn, argv, words in cases:
        assert fn(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.startswith("error: ") and err.count("\n") == 1, err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_path, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rank_, world_, _, device = train.setup_distributed()
    from model.config import load_config
    cfg = dict(load_config(cfg_path), sync_bn=False)    # SyncBatchNorm would change the gradients
    # gradients: DDP on each rank's own batch vs the mean of single-process gradients on both batches
    torch.manual_seed(0)
    net = evaluate.model_for(cfg)
    torch.manual_seed(1)
    images = torch.randn(world, 2, 3, 32, 32)
    def loss_of(m, x):     # every output, so that every parameter takes part (as in training)
        out = m(x)
        preds = [v for k, v in out.items() if k != "deep_supervision"]
        preds += [p for d in out["deep_supervision"].values() for p in d.values()]
        return sum(p.square().mean() for p in preds)

    ref = []
    for i, x in enumerate(images):
        single = evaluate.model_for(cfg)
        single.load_state_dict(net.state_dict())
        torch.manual_seed(2 + i)      # the same DropPath draws as rank i below
        loss_of(single, x).backward()
        ref.append({n: p.grad.clone() for n, p in single.named_parameters() if p.grad is not None})
    ddp = train.wrap_model(net, cfg, device, world)
    torch.manual_seed(2 + rank)
    loss_of(ddp, images[rank]).backward()
    # relative to the largest gradient entry of the model (float32 sums in another order)
    params = [(n, p.grad) for n, p in ddp.module.named_parameters() if n in ref[0]]
    scale = max((ref[0][n] + ref[1][n]).abs().max().item() / 2 for n, _ in params)
    worst = max((g - (ref[0][n] + ref[1][n]) / 2).abs().max().item() for n, g in params) / scale
    also_rank = max((g - ref[rank][n]).abs().max().item() for n, g in params) / scale
    # a short training run: count checkpoint writes per rank
    writes = []
    real = train.save_atomic
    train.save_atomic = lambda obj, path: (writes.append(str(path)), real(obj, path))[1]
    code = train.main(["--config", cfg_path, "--out", out, "--max-steps", "2"])
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps({"worst": worst, "own": also_rank, "writes": writes, "code": code}))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_average_gradients_and_checkpoint_once(tmp_path):
    cfg = tiny_config(tmp_path, "sync_bn: true\n")
    out = tmp_path / "run"
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(out), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["code"] == r1["code"] == 0
    assert r0["worst"] < 1e-4 and r1["worst"] < 1e-4, (r0, r1)
    assert r0["own"] > 1e-2, r0     # and each rank's gradient is not simply its own
    # epoch end (last), final evaluation (last, best): each written once, by rank 0 only
    ckpts = out / "checkpoints"
    assert r1["writes"] == [] and r0["writes"] == [str(ckpts / "last.pt"), str(ckpts / "last.pt"),
                                                   str(ckpts / "best.pt")]
    assert len(train_losses(out)) == 2      # rank 0 logs, once per step


FAULT_PROBE = """
import resource, torch
from model.train import keep_freed_memory
applied = keep_freed_memory()
faults = []
for _ in range(12):  # a step's worth of activations: three 16 MiB blocks and a 64 MiB one, freed together
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(n).fill_(1.0) for n in (4 << 20, 4 << 20, 4 << 20, 16 << 20)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, max(faults[-4:]))  # once the heap has settled
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_stops_fresh_page_faults():
    """After keep_freed_memory (what model.train applies on CPU), memory a step frees is reused by the next step
    without faulting its pages in from the OS again. In a fresh process, so that the test's own process keeps
    glibc's defaults until then."""
    pages = (3 * 16 + 64 << 20) // os.sysconf("SC_PAGE_SIZE")
    out = subprocess.run([sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) < pages // 10, f"{out[1]} minor faults for {pages} pages reused"


def test_cpu_training_keeps_freed_memory_unless_asked_not_to(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = tiny_config(tmp_path)
    assert train.main(["--config", cfg, "--out", str(tmp_path / "a"), "--max-steps", "1"]) == 0
    assert calls == [1]
    assert train.main(["--config", cfg, "--out", str(tmp_path / "b"), "--max-steps", "1",
                       "--return-freed-memory"]) == 0
    assert calls == [1]
