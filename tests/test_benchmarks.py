"""Smoke tests of the benchmark scripts at tiny sizes: they run, their JSON rows carry the fields the table, the
plots and the GPU check's summary read, and plot.py turns those rows into PNGs and a summary."""
import copy
import json
import os

import pytest
import torch

import fused_mtl_attn
from benchmarks import bench_ops, bench_train, common, plot
from benchmarks.labels import cpu_note
from fused_mtl_attn.cpuinfo import first_processor
from model import TASK_SETS, build_model
from model import compile as model_compile
from model.losses import MultiTaskLoss

ENV_FIELDS = {"device", "device_name", "torch", "triton", "commit"}


@pytest.fixture(scope="module")
def ops_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("ops") / "ops.json"
    rows = bench_ops.main(["--device", "cpu", "--quick", "--datasets", "nyud,pascal", "--positions-scale", "0.05",
                           "--min-run-time", "0.005", "--batch", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(rows))
    return rows


@pytest.fixture(scope="module")
def train_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "train.json"
    rows = bench_train.main(["--device", "cpu", "--configs", "nyud2", "--batch", "2", "--size", "32", "32",
                             "--widths", "12", "12", "12", "12", "--repeats", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(rows))
    return rows


def test_ops_shapes_cover_the_paper():
    nyud = bench_ops.cases(["nyud"], bench_ops.PAIRS, 2)
    pascal = bench_ops.cases(["pascal"], [2], 1)
    assert [c["hw"] for c in nyud if c["name"] == "ctam P=20"] == [[120, 160], [60, 80], [30, 40], [15, 20]]
    assert [c["hw"] for c in pascal if c["op"] == "cross_task"] == [[128, 128], [64, 64], [32, 32], [16, 16]]
    assert {c["name"] for c in nyud if c["op"] == "cross_task"} == {f"ctam P={p}" for p in (2, 6, 12, 20)}
    csam = [c for c in nyud if c["op"] == "cross_scale"]
    assert [(c["scale"], c["name"]) for c in csam] == [(0, "csam J=3"), (1, "csam J=2"), (2, "csam J=1")]
    assert csam[0]["offsets"] == [0, 4800, 4800 + 1200, 4800 + 1200 + 300]
    assert csam[0]["shapes"] == ((2, 36, 19200), (2, 36, 6300), (2, 36, 6300))
    # CTAM P=2 at 1/4: fwd reads q, k, v and writes out; bwd reads q, k, v, grad and writes dq, dk, dv
    ctam = next(c for c in nyud if c["name"] == "ctam P=2")
    n = 2 * 2 * 36 * 19200
    assert bench_ops.min_bytes(ctam, 4) == (4 * n * 4, 7 * n * 4)
    # CSAM J=3: the output is [B, J, C, Nq]
    out = 2 * 3 * 36 * 19200
    assert bench_ops.min_bytes(csam[0], 2)[0] == (2 * 36 * 19200 + 2 * 2 * 36 * 6300 + out) * 2


def test_ops_flops_count_the_contractions():
    # CTAM B=1, P=2, d=4, m=3, N=10 (2*d*m = 24 per position and contraction): forward S over 2*10 source and S q
    # over 2*10 query positions; backward three contractions over the queries, two over the sources
    ctam = dict(op="cross_task", offsets=None, shapes=((1, 2, 4, 10), (1, 2, 4, 10), (1, 2, 3, 10)))
    assert bench_ops.min_flops(ctam) == 24 * (20 + 20) + 24 * (3 * 20 + 2 * 20)
    # CSAM B=2, J=2 sources of 5 and 7 positions (12), 6 queries attended per source (2*6)
    csam = dict(op="cross_scale", offsets=[0, 5, 12], shapes=((2, 4, 6), (2, 4, 12), (2, 3, 12)))
    assert bench_ops.min_flops(csam) == 2 * 24 * ((12 + 12) + (3 * 12 + 2 * 12))


def test_ops_rows(ops_rows):
    assert {r["dataset"] for r in ops_rows} == {"nyud", "pascal"}
    assert {r["case"] for r in ops_rows} == {"ctam P=2", "csam J=3", "csam J=2", "csam J=1"}
    assert "eager" in {r["backend"] for r in ops_rows}
    for r in ops_rows:
        assert "error" not in r, r["error"]
        assert ENV_FIELDS <= set(r)
        for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "saved_mb", "gb_per_s", "bw_fraction", "tflops", "device_gb_per_s",
                    "min_bytes", "eager_over_this", "mem_over_eager"):
            assert r[key] is not None and r[key] >= 0, key
        assert r["min_bytes"] == r["fwd_bytes"] + r["bwd_bytes"]
        assert r["batch"] == 1 and r["scale"] in range(4) and r["dtype"] == "float32"
    assert all(r["eager_over_this"] == 1 for r in ops_rows if r["backend"] == "eager")


def test_train_rows(train_rows):
    assert [(r["config"], r["variant"], r["fused_adam"], r["fused_loss"]) for r in train_rows] == [
        ("nyud2", "reference", False, False), ("nyud2", "fused", True, True),
        ("nyud2", "reference_fused_adam", True, False), ("nyud2", "fused_reference_loss", True, False)]
    for r in train_rows:
        assert "compile_s" not in r
        assert "error" not in r, r["error"]
        assert ENV_FIELDS <= set(r)
        for key in ("step_ms", "saved_bytes", "time_ratio", "saved_ratio"):
            assert r[key] > 0, key
        assert r["dtype"] == "fp32" and r["size"] == [32, 32]
        assert len(r["step_ms_rounds"]) == len(r["time_ratio_rounds"]) == r["steps_timed"]
        assert min(r["step_ms_rounds"]) <= r["step_ms"] <= max(r["step_ms_rounds"])


def test_environment_names_the_cpu_kernels_instruction_sets(monkeypatch):
    """Rows and table headers say which instruction sets ran, and whether one was capped by an environment variable
    (an AVX2 machine's code paths timed on an AVX-512 one)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    env = common.environment("cpu")
    assert env["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "ONEDNN_MAX_CPU_ISA" not in env["isa_limits"] and "capped" not in cpu_note(
        {**env, "isa_limits": {}})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    env = common.environment("cpu")
    assert env["isa_limits"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    note = cpu_note(env)
    assert f"PyTorch {env['aten_cpu_capability']}" in note and "ONEDNN_MAX_CPU_ISA=AVX2" in note
    assert note in plot.title_env([env])  # plots of a capped run say so too


def test_cpu_name_says_family_and_model(monkeypatch, tmp_path):
    """A cloud VM's generic model name comes with the numbers that tell its generation (from the first processor's
    block of /proc/cpuinfo)."""
    info = tmp_path / "cpuinfo"
    block = ("processor\t: {}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: {}\n"
             "model name\t: Intel(R) Xeon(R) Processor\n\n")
    info.write_text(block.format(0, 207) + block.format(1, 143))
    monkeypatch.setattr(common, "first_processor", lambda: first_processor(str(info)))
    assert first_processor(str(info))["vendor_id"] == "GenuineIntel"
    assert common.cpu_name() == "Intel(R) Xeon(R) Processor (cpu family 6, model 207)"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert common.cpu_name() == "Some CPU"
    assert first_processor(str(tmp_path / "missing")) == {}  # unreadable (not Linux): nothing known


def test_interleaved_rounds_rotate_the_order():
    """Every variant runs once per round and, over as many rounds as variants, once in every position."""
    calls = []
    steps = {name: (lambda name=name: calls.append(name) or 1.0) for name in "abc"}
    times = bench_train.interleaved_times(steps, 3)
    assert times == {name: [1.0] * 3 for name in "abc"}
    rounds = [calls[i:i + 3] for i in range(0, 9, 3)]
    assert all(sorted(r) == list("abc") for r in rounds)
    assert all(sorted(position) == list("abc") for position in zip(*rounds))


def test_loss_rows():
    """--loss times the loss alone, reference and fused, on predictions of the network's output shapes; the fused
    loss saves less (no upsampled logits or log-softmax)."""
    rows = bench_train.main(["--device", "cpu", "--loss", "--configs", "nyud2", "--batch", "2", "--size", "64", "64",
                             "--widths", "12", "12", "12", "12", "--repeats", "1"])
    assert [r["variant"] for r in rows] == ["loss_reference", "loss_fused"]
    for r in rows:
        assert ENV_FIELDS <= set(r) and r["loss_ms"] > 0 and r["saved_bytes"] > 0
    assert rows[0]["time_ratio"] == 1 and rows[1]["saved_ratio"] < 0.5


def test_head_rows():
    """--head times one task's head alone: the reference, the fused head with eager BatchNorm + ReLU, by [c, N] blocks,
    channels-last, as chosen (the switches are restored afterwards); the fused heads save less (no 1080-channel
    concatenation)."""
    from model import fused_ops

    kernel_check, channels_last = fused_ops.cpu_kernels_run, fused_ops.CHANNELS_LAST_AGGREGATION
    rows = bench_train.main(["--device", "cpu", "--head", "--configs", "nyud2", "--batch", "2", "--size", "64", "64",
                             "--widths", "12", "12", "12", "12", "--repeats", "1"])
    assert fused_ops.cpu_kernels_run is kernel_check and fused_ops.CHANNELS_LAST_AGGREGATION is channels_last
    assert [r["variant"] for r in rows] == ["head_reference", "head_fused_eager_bn_relu", "head_fused_blocks",
                                            "head_fused_channels_last", "head_fused"]
    for r in rows:
        assert ENV_FIELDS <= set(r) and r["head_ms"] > 0 and r["saved_bytes"] > 0
    assert rows[0]["time_ratio"] == 1 and all(r["saved_ratio"] < 1 for r in rows[1:])


def test_region_rows(capsys):
    """--regions times each block regional compilation can compile, eager and compiled, on both paths, fed the inputs
    of a real step (an HRNet module, which writes into its input list, gets a fresh list each call). Here with two
    block classes and AOTAutograd with eager kernels (Inductor takes minutes per block on 2 cores)."""
    from timm.models.hrnet import HighResolutionModule

    from model.network import CrossTaskAttention

    torch.manual_seed(0)
    net = build_model(TASK_SETS["nyud2"], widths=(12, 12, 12, 12)).train()
    batch = bench_train.random_batch(TASK_SETS["nyud2"], 2, (32, 32), "cpu")
    with torch._dynamo.config.patch(recompile_limit=8):  # Dynamo's default, restored on leaving
        rows = bench_train.measure_regions(net, MultiTaskLoss(list(TASK_SETS["nyud2"])), batch, "cpu", repeats=1,
                                           types=(HighResolutionModule, CrossTaskAttention), backend="aot_eager")
        # room for a frame per shape, as compile_regions leaves (PASCAL has 16 initial heads' shapes)
        assert torch._dynamo.config.recompile_limit >= model_compile.REGION_RECOMPILE_LIMIT
    blocks = [f"backbone.stage{s}.{i}" for s, n in ((2, 1), (3, 3), (4, 2)) for i in range(n)] + \
        [f"cross_task.{k}" for k in range(4)]
    assert [(r["path"], r["block"]) for r in rows] == [(p, b) for p in ("reference", "fused") for b in blocks]
    assert {r["block_class"] for r in rows} == {"HighResolutionModule", "CrossTaskAttention",
                                                "FusedCrossTaskAttention"}
    for r in rows:
        assert r["eager_ms"] > 0 and r["compiled_ms"] > 0 and r["time_ratio"] == r["compiled_ms"] / r["eager_ms"]
    # one Dynamo frame per class and shapes: the stage-3 modules after the first reuse it
    assert rows[1]["compile_s"] > 0 and rows[2]["compile_s"] == rows[3]["compile_s"] == 0
    bench_train.print_region_table([dict(r, config="nyud2") for r in rows])
    assert "FusedCrossTaskAttention" in capsys.readouterr().out


@pytest.mark.parametrize("part", ["--head", "--loss", "--regions", "--breakdown"])
@pytest.mark.parametrize("extra", [["--compile"], ["--layouts"], ["--amp", "bf16"]])
def test_part_modes_reject_step_options(part, extra, capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--device", "cpu", part, *extra])
    assert "apply to the whole step" in capsys.readouterr().err


def test_compile_paths_needs_compile(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--device", "cpu", "--compile-paths", "fused"])
    assert "give --compile too" in capsys.readouterr().err


def test_train_compiled_variants_report_their_compile_time(monkeypatch):
    """--compile adds the compiled reference and the compiled fused path (with model.train's fused Adam and loss), and a
    compiled variant's row has the seconds its first step spent compiling. Timed here with Dynamo alone on the
    reference path (Inductor takes many minutes on 2 cores; tests/test_compile.py checks the compiled fused path)."""
    torch.manual_seed(0)
    net = build_model(TASK_SETS["nyud2"], widths=(12, 12, 12, 12))
    variants = bench_train.variants_of(net, "cpu", layouts=False, compile_mode="regional")
    assert {v: (spec.fused_adam, spec.fused_loss) for v, spec in variants.items()} == {
        "reference": (False, False), "fused": (True, True), "reference_fused_adam": (True, False),
        "fused_reference_loss": (True, False), "compiled_reference": (False, False), "compiled_fused": (True, True)}
    assert variants["compiled_fused"].net.fused and not variants["compiled_reference"].net.fused
    fused_only = bench_train.variants_of(net, "cpu", layouts=False, compile_mode="regional", compile_paths="fused")
    assert "compiled_fused" in fused_only and "compiled_reference" not in fused_only
    batch = bench_train.random_batch(TASK_SETS["nyud2"], 2, (32, 32), "cpu")
    loss_fn = MultiTaskLoss(list(TASK_SETS["nyud2"]))
    monkeypatch.setattr(model_compile, "DEFAULT_BACKEND", "eager")
    timed = {"reference": variants["reference"],
             "compiled_reference": bench_train.Variant(model_compile.compile_model(copy.deepcopy(net), "regional"))}
    rows = bench_train.measure(timed, loss_fn, batch, "cpu", amp=False, repeats=1)
    assert rows["compiled_reference"]["compile_s"] > 0 and "compile_s" not in rows["reference"]


def test_summary(ops_rows, train_rows):
    error = dict(ops_rows[0], error="OutOfMemoryError: boom")
    text = plot.summary(ops_rows + [error], train_rows, [("build", "0", "12"), ("ops", "124", "300")])
    assert "| ops | 124 | 300 |" in text
    assert "| nyud2 | 2 | [32, 32] | fused |" in text
    assert "| nyud | csam (J=3,2,1) |" in text and "| pascal | ctam P=2 |" in text
    assert "OutOfMemoryError: boom" in text
    assert "No benchmark rows" in plot.summary([], [])


def test_plots(ops_rows, train_rows, tmp_path):
    pytest.importorskip("matplotlib")
    ops, train = tmp_path / "ops.json", tmp_path / "train.json"
    ops.write_text(json.dumps(ops_rows))
    train.write_text(json.dumps(train_rows))
    paths = plot.main(["--ops", str(ops), "--train", str(train), "--out", str(tmp_path / "png"),
                       "--summary", str(tmp_path / "summary.md")])
    assert sorted(os.path.basename(p) for p in paths) == ["ops_memory.png", "ops_speedup.png", "train_ratios.png"]
    assert all(os.path.getsize(p) > 10_000 for p in paths)
    assert (tmp_path / "summary.md").read_text().startswith("# Benchmark summary")
    # either input is optional, and a missing file is no error
    assert plot.main(["--train", str(train), "--ops", str(tmp_path / "missing.json"),
                      "--out", str(tmp_path / "only_train")]) == [str(tmp_path / "only_train" / "train_ratios.png")]


def test_tune_triton_rows_and_forced_config(monkeypatch, tmp_path):
    from benchmarks import tune_kernels
    from fused_mtl_attn import triton_kernels as tk

    # every launch inside a forced config uses its blocks (else the tuning rows would all time one config)
    seen = []
    real = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda kernel, grid, *a, **meta: (seen.append(meta["BLOCK_N"]),
                                                                          real(kernel, grid, *a, **meta)))
    path = tmp_path / "tune.json"
    rows = tune_kernels.main(["--device", "cpu", "--batch", "1", "--positions-scale", "0.02", "--pairs", "2",
                             "--dtypes", "float32", "--configs", "16/16/4,32/32/8", "--min-run-time", "0.01",
                             "--json", str(path)])
    assert [(r["case"], r["config"]) for r in rows] == [
        ("csam J=3", [16, 16, 4, 1]), ("csam J=3", [32, 32, 8, 1]),
        ("ctam P=2", [16, 16, 4, 1]), ("ctam P=2", [32, 32, 8, 1])]
    for r in rows:
        assert "error" not in r, r["error"]
        assert r["fwd_bwd_ms"] > 0 and r["bw_fraction"] > 0 and r["tflops"] > 0 and r["dtype"] == "float32"
    assert set(seen) == {16, 32}
    assert json.loads(path.read_text()) == rows


@pytest.mark.parametrize("bad", [["--configs", "32/30/8"], ["--configs", "32/32"], ["--dtypes", "int32"],
                                 ["--batch", "0"], ["--pairs", "two"], ["--backend", "cpu"],
                                 ["--backend", "cuda"]])  # with --device cpu
def test_tune_kernels_rejects_bad_arguments(bad, capsys):
    from benchmarks import tune_kernels

    with pytest.raises(SystemExit):
        tune_kernels.main(["--device", "cpu", *bad])
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["512/16", "0/16/1", "512/0/1", "512/16/2", "a/16/1"])
def test_tune_kernels_rejects_bad_cuda_configs(text):
    from benchmarks import tune_kernels

    with pytest.raises(ValueError, match="TARGET_BLOCKS/MAX_SPLITS/ONE_PASS"):
        tune_kernels.parse_config(text, "cuda")
    assert tune_kernels.parse_config("1024/32/0", "cuda") == (1024, 32, 0)


@pytest.mark.skipif(not fused_mtl_attn.available_backends()["cpu"][0], reason="the C++ extension is not built")
def test_layers_rows(tmp_path):
    from benchmarks import bench_layers

    import model.fused_ops

    switched = model.fused_ops.CHANNELS_LAST_BATCH_NORM_MIN_ROWS
    conv_projections = model.fused_ops.CONV_PROJECTIONS_MAX_POSITIONS
    rows = bench_layers.main(["--rounds", "1", "--json", str(tmp_path / "layers.json")])
    assert model.fused_ops.CHANNELS_LAST_BATCH_NORM_MIN_ROWS == switched  # the network's default is left as it was
    # (switches put back after the head's dense-rows variant and CTAM's projection variants)
    assert model.fused_ops.ROW_TAPS and model.fused_ops.CONV_PROJECTIONS_MAX_POSITIONS == conv_projections
    assert {r["kind"] for r in rows} == {"swin", "batch_norm", "head", "ctam"}
    assert len(rows) == len(bench_layers.SWIN) + len(bench_layers.BATCH_NORM) + 1 + 4
    for r in rows:
        assert r["eager_ms"] > 0 and r["fused_ms"] > 0 and r["time_ratio"] == r["fused_ms"] / r["eager_ms"]
        for variant in bench_layers.ALTERNATIVES.get(r["kind"], {}):
            assert r[f"{variant}_ms"] > 0, (r, variant)
    assert [r["case"] for r in rows if r["kind"] == "ctam"] == [f"pascal5 {s}x{s}" for s in (64, 32, 16, 8)]
    assert (tmp_path / "layers.json").exists()
    with pytest.raises(SystemExit):
        bench_layers.main(["--rounds", "0"])


def test_train_rows_count_page_faults_and_name_the_allocator(train_rows):
    assert all(r["malloc"] == "system" and r["faulted_bytes"] >= 0 for r in train_rows)


def test_train_variants_alone_without_reference_have_no_ratios(capsys):
    rows = bench_train.main(["--device", "cpu", "--configs", "nyud2", "--size", "32", "32", "--widths", "12", "12",
                             "12", "12", "--repeats", "1", "--variants", "fused"])
    assert [r["variant"] for r in rows] == ["fused"]
    assert "time_ratio" not in rows[0] and rows[0]["step_ms"] > 0
    assert "fused" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_train.main(["--device", "cpu", "--configs", "nyud2", "--size", "32", "32", "--widths", "12", "12",
                          "12", "12", "--repeats", "1", "--variants", "fused,fast"])
    assert "--variants: unknown ['fast']" in capsys.readouterr().err


def test_breakdown_rows(capsys):
    """--breakdown: a row per path and part (and the whole step) with forward, backward and total ms; every part of
    the network has a forward and a backward on both paths, and the parts add up to the step without overlapping
    ("other", what is left, is not negative)."""
    from benchmarks.step_breakdown import HOOKED, PARTS

    rows = bench_train.main(["--device", "cpu", "--breakdown", "--configs", "nyud2", "--batch", "2", "--size", "64",
                             "64", "--widths", "12", "12", "12", "12", "--repeats", "1"])
    assert [(r["variant"], r["part"]) for r in rows] == [
        (f"breakdown_{path}", part) for part in PARTS + ("step",) for path in ("reference", "fused")]
    by = {(r["variant"][len("breakdown_"):], r["part"]): r for r in rows}
    for path in ("reference", "fused"):
        for part in ("backbone", "loss") + HOOKED:
            assert by[path, part]["forward_ms"] > 0 and by[path, part]["backward_ms"] > 0, (path, part)
        assert by[path, "optimizer"]["total_ms"] > 0 and by[path, "other"]["total_ms"] >= 0
        assert sum(by[path, part]["total_ms"] for part in PARTS) == pytest.approx(by[path, "step"]["total_ms"])
        assert ENV_FIELDS <= set(by[path, "step"]) and by[path, "step"]["share"] == 1
    assert by["fused", "heads"]["time_ratio"] == by["fused", "heads"]["total_ms"] / by["reference", "heads"]["total_ms"]
    assert "cross_task" in capsys.readouterr().out


CLOCK = [0.0]  # the virtual seconds of test_step_timeline_attributes_time_to_its_part


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward takes one virtual second."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        CLOCK[0] += 1.0
        return grad


def test_step_timeline_attributes_time_to_its_part(monkeypatch):
    """On a virtual clock that only a task head's forward and backward advance (one second each), the timeline
    gives the heads exactly those seconds and every other part none, and the parts add up to the step; the hooks
    are gone afterwards. The fused path here recomputes its Swin layers in backward (as where the C++ kernels do
    not run): a forward recomputed in backward is not a call."""
    from benchmarks.step_breakdown import PARTS, StepTimeline
    from model import fused as model_fused

    monkeypatch.setattr(model_fused, "cpu_kernels_run", lambda x: False)
    torch.manual_seed(0)
    tasks = TASK_SETS["nyud2"]
    net = build_model(tasks, widths=(12, 12, 12, 12)).train().set_fused(True)
    batch = bench_train.random_batch(tasks, 2, (64, 64), "cpu")
    loss_fn = MultiTaskLoss(list(tasks))
    for head in net.heads.values():
        forward = head.forward

        def slow(features, forward=forward):
            CLOCK[0] += 1.0
            return _SlowBackward.apply(forward(features))
        monkeypatch.setattr(head, "forward", slow)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    timeline = StepTimeline(net, "cpu")
    monkeypatch.setattr(timeline, "clock", lambda: CLOCK[0])
    with timeline:
        parts = timeline.step(lambda: net(batch["image"]), lambda out: loss_fn(out, batch)[0], opt.step)
    assert len(timeline.calls) == 4 + 8 + 4 + 3 + 2  # Swin layers, initial predictions, CTAM, FPMA, heads
    assert all("backward_start" in c and "backward_end" in c for c in timeline.calls)
    assert parts["heads"] == (2000.0, 2000.0, 4000.0) and parts["step"][2] == 4000.0
    assert all(parts[p][2] == 0 for p in PARTS if p != "heads"), parts
    assert all(not m._forward_hooks and not m._forward_pre_hooks for ms in timeline.modules.values() for m in ms)
