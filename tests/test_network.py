"""The reference SCA-MTL network: shapes for the field's task sets, gradients, determinism, errors, weights."""
import copy

import pytest
import torch

from model import TASK_SETS, build_model, parameter_counts
from model.modules import Projection
from model.network import CSAM_PAIRS

SMALL = (12, 24, 48, 96)  # the default topology at a third of the width, so tests stay fast

CONFIGS = TASK_SETS


def _ceil_div(a, b):
    return -(-a // b)


@pytest.mark.parametrize("config, size", [("nyud2", (64, 96)), ("nyud4", (70, 90)), ("pascal3", (33, 47)),
                                          ("pascal5", (64, 64))])
def test_output_shapes(config, size):
    tasks = CONFIGS[config]
    torch.manual_seed(0)
    net = build_model(tasks, widths=SMALL).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, *size))
    for t, n in tasks.items():
        assert out[t].shape == (2, n, *size), t
    assert sorted(out["deep_supervision"]) == [0, 1, 2, 3]
    for k, preds in out["deep_supervision"].items():
        stride = 4 * 2**k
        for t, n in tasks.items():
            assert preds[t].shape == (2, n, _ceil_div(size[0], stride), _ceil_div(size[1], stride)), (k, t)


def test_default_widths_give_1080_channel_aggregation():
    net = build_model(CONFIGS["nyud2"])
    conv = net.heads["semseg"].aggregate.conv
    assert conv.in_channels == conv.out_channels == 1080
    assert [f["num_chs"] for f in net.backbone.feature_info.get_dicts()] == [18, 36, 72, 144]
    assert len(CSAM_PAIRS) == 6
    counts = parameter_counts(net)
    assert counts["total"] == sum(p.numel() for p in net.parameters())
    assert counts["backbone"] == sum(p.numel() for p in net.backbone.parameters())


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    net = build_model(CONFIGS["pascal3"], widths=SMALL).train()
    out = net(torch.randn(2, 3, 64, 64))
    loss = sum(out[t].square().mean() for t in CONFIGS["pascal3"])
    loss = loss + sum(p.square().mean() for preds in out["deep_supervision"].values() for p in preds.values())
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    # SE bottlenecks of 24/16 = 1 unit may sit in a dead ReLU at this width: a legitimate zero gradient
    zero = [n for n, p in net.named_parameters() if not p.grad.abs().sum() > 0 and ".excite." not in n]
    assert not zero, f"all-zero gradient in {zero[:5]}"


def test_same_seed_same_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        net = build_model(CONFIGS["nyud2"], widths=SMALL).train()  # train mode: drop path draws from the RNG
        torch.manual_seed(4)
        outs.append(net(torch.randn(1, 3, 64, 64))["semseg"])
    assert torch.equal(outs[0], outs[1])


def test_bad_tasks_and_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="unknown task.*'segm'"):
        build_model({"segm": 40, "depth": 1})
    with pytest.raises(ValueError, match="at least 2 tasks"):
        build_model({"depth": 1})
    with pytest.raises(ValueError, match=r"tasks\['depth'\] must be a positive"):
        build_model({"semseg": 40, "depth": 0})
    with pytest.raises(TypeError, match="tasks must be a dict"):
        build_model(["semseg", "depth"])
    with pytest.raises(ValueError, match="widths must be"):
        build_model(CONFIGS["nyud2"], widths=(12, 24, 48))
    net = build_model(CONFIGS["nyud2"], widths=SMALL)
    with pytest.raises(ValueError, match="rank 4"):
        net(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="3 channels"):
        net(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="at least 32 px"):
        net(torch.randn(1, 3, 16, 64))


def test_pretrained_backbone_loads_from_a_local_file(tmp_path, monkeypatch):
    torch.manual_seed(5)
    donor = build_model(CONFIGS["nyud2"]).backbone
    path = tmp_path / "hrnet.pth"
    torch.save(donor.state_dict(), path)
    net = build_model(CONFIGS["nyud2"], pretrained=str(path))
    for (name, a), b in zip(donor.state_dict().items(), net.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    monkeypatch.delenv("FUSED_MTL_ATTN_HRNET_WEIGHTS", raising=False)
    with pytest.raises(ValueError, match="needs a local weights file"):
        build_model(CONFIGS["nyud2"], pretrained=True)
    with pytest.raises(FileNotFoundError, match="no file at"):
        build_model(CONFIGS["nyud2"], pretrained=str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds no tensor"):
        build_model(CONFIGS["nyud2"], pretrained=str(tmp_path / "other.pth"))


def test_backbone_batchnorm_momentum_is_hrnet_s():
    net = build_model(CONFIGS["nyud2"], widths=SMALL)
    moms = {m.momentum for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert moms == {0.01}
    rest = {m.momentum for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and not n.startswith("backbone")}
    assert rest == {0.1}


def test_hrnet_features_is_timm_forward():
    """The fused path's backbone forward (stem split out for recomputation) is timm's, bit for bit."""
    from model.fused import hrnet_features

    torch.manual_seed(0)
    net = build_model(CONFIGS["nyud2"], widths=SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = net.backbone(x)
        got = hrnet_features(net.backbone, x, lambda stem, x: stem(x))
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _sequential_layout(net):
    """A copy of `net` whose named conv-BN layers sit in nn.Sequential positions again, as they did before they were
    named: its state dict has the old keys."""
    old = copy.deepcopy(net)
    for module in list(old.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Projection):
                layers = [layer for conv, bn, relu in child.stages()
                          for layer in (conv, bn) + ((torch.nn.ReLU(),) if relu else ())]
                setattr(module, name, torch.nn.Sequential(*layers))
            elif name == "aggregate":
                setattr(module, name, torch.nn.Sequential(*child))
    return old


@pytest.mark.parametrize("fused", [False, True])
def test_state_dict_with_sequential_positions_loads(fused):
    torch.manual_seed(0)
    net = build_model(CONFIGS["nyud2"], widths=SMALL).eval()
    old = _sequential_layout(net).state_dict()
    for key in ("cross_task.0.attention.semseg_from_depth.query.4.running_var",
                "heads.semseg.attention.2.value.1.weight", "initial.0.depth.blocks.0.shortcut.0.weight",
                "heads.depth.aggregate.3.bias"):  # keys as the Sequential layout wrote them
        assert key in old
    assert len(set(old) - set(net.state_dict())) > 100
    keys = list(old)
    torch.manual_seed(1)
    other = build_model(CONFIGS["nyud2"], widths=SMALL, fused=fused).eval()
    other.load_state_dict(old)  # strict: every old key lands on its layer
    assert list(old) == keys, "loading must not rename the caller's keys"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = net(x), other.set_fused(False)(x)
    for t in CONFIGS["nyud2"]:
        assert torch.equal(got[t], want[t]), t
