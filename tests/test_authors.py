"""The authors' checkpoints (model/authors.py): their key layout, taken from tables of their state dicts
(tests/data/authors), loads into the network of each task set, round-trips, and fails loudly when it does not fit."""
import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from model import TASK_SETS, build_model
from model.authors import (AuthorsCheckpointError, authors_state_dict, key_map, load_authors_checkpoint,
                           read_authors_file)

TABLES = Path(__file__).parent / "data" / "authors"
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def table(name) -> list:
    with gzip.open(TABLES / f"{name}.tsv.gz", "rt") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def window_index(window=7):
    """Swin's relative position index, written out: (dy + w - 1) * (2w - 1) + (dx + w - 1) per pair of tokens."""
    idx = torch.empty(window ** 2, window ** 2, dtype=torch.int64)
    for i in range(window ** 2):
        for j in range(window ** 2):
            dy, dx = i // window - j // window, i % window - j % window
            idx[i, j] = (dy + window - 1) * (2 * window - 1) + dx + window - 1
    return idx


def authors_checkpoint(name, seed=0) -> dict:
    """A state dict in the authors' layout with random values (the index buffers hold the real index)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for row in table(name):
        shape = tuple(int(s) for s in row["shape"].split(",")) if row["shape"] else ()
        if row["key"].endswith("relative_position_index"):
            out[row["key"]] = window_index()
        elif DTYPES[row["dtype"]] == torch.int64:
            out[row["key"]] = torch.randint(0, 1000, shape, generator=g)
        elif row["key"].endswith("running_var"):
            out[row["key"]] = torch.rand(shape, generator=g) + 0.5
        else:  # small enough that a forward pass stays finite
            out[row["key"]] = 0.1 * torch.randn(shape, generator=g)
    return out


@pytest.mark.parametrize("name", ["nyud2", "nyud4", "pascal3", "pascal5"])
def test_authors_layout_loads_and_round_trips(name):
    """Every key of theirs maps (or is one of the dropped norm2/index rows), shapes and dtypes equal, and the values
    come back where they were."""
    net = build_model(TASK_SETS[name])
    rows = table(name)
    exported = authors_state_dict(net)
    assert {r["key"]: (r["shape"], r["dtype"]) for r in rows} == {
        k: (",".join(map(str, v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in exported.items()}
    theirs = authors_checkpoint(name)
    load_authors_checkpoint(net, theirs)
    back = authors_state_dict(net)
    for key, value in theirs.items():
        if ".norm2." in key:  # dropped: never used; exported at the initial 1 / 0 their files hold
            assert torch.equal(back[key], torch.full_like(value, 1.0 if key.endswith("weight") else 0.0)), key
        else:
            assert torch.equal(back[key], value), key


# Layers whose role the shapes alone cannot tell apart (same shape, different place in the computation)
ROLES = {
    "backbone.stage4.1.fuse_layers.0.1.0.weight": "backbone.stage4.1.fuse_layers.0.1.0.weight",
    "swTransform1.layers.0.blocks.1.attn.qkv.weight": "self_attention.0.blocks.1.attn.qkv.weight",
    "swTransform4.norm0.weight": "self_attention.3.norm.weight",
    "swTransform4.patch_embed.norm.weight": "self_attention.3.embed_norm.weight",
    "scale_2.refinement.depth.1.conv2.weight": "initial.2.depth.blocks.1.conv2.weight",
    "scale_0.decoders.semseg.weight": "initial.0.semseg.predict.weight",
    "distillation_scale_1.cross_attention.semseg.depth.query_project.0.conv.weight":
        "cross_task.1.attention.semseg_from_depth.query.conv1.weight",
    "distillation_scale_1.cross_attention.depth.semseg.key_project.1.bn.running_var":
        "cross_task.1.attention.depth_from_semseg.key.bn2.running_var",
    "distillation_scale_3.cross_attention.depth.semseg.value_project.bn.weight":
        "cross_task.3.attention.depth_from_semseg.value.bn1.weight",
    "distillation_scale_0.dimensionality_reduction.downsample.1.bias": "cross_task.0.block.shortcut.bn1.bias",
    "fpm_scale_2.swtf.layers.0.blocks.0.attn.proj.weight": "propagation.2.attention.blocks.0.attn.proj.weight",
    "fpm_scale_1.se.depth.squeeze.2.weight": "propagation.1.excite.depth.fc2.weight",
    "fpm_scale_3.dimensionality_reduction.conv2.weight": "propagation.3.block.conv2.weight",
    "heads.semseg.upsample31.0.weight": "heads.semseg.projection.1_from_3.0.weight",
    "heads.depth.upsample10.1.running_mean": "heads.depth.projection.0_from_1.1.running_mean",
    "heads.depth.cross_scale_attention1.query_project.1.conv.weight": "heads.depth.attention.1.query.conv2.weight",
    "heads.semseg.last_layer.1.weight": "heads.semseg.aggregate.bn.weight",
    "heads.semseg.last_layer.3.bias": "heads.semseg.aggregate.predict.bias",
}


def test_each_layer_of_theirs_takes_the_role_it_has_here():
    mapping = key_map(build_model(TASK_SETS["nyud2"]))
    assert {k: mapping[k] for k in ROLES} == ROLES
    assert len(set(mapping.values())) == len(mapping)  # one of theirs per tensor of ours


def test_task_order_is_the_authors_whatever_the_caller_lists():
    """Their modules concatenate tasks in a fixed order; a network built from another listing computes the same."""
    shuffled = {t: TASK_SETS["nyud4"][t] for t in ("depth", "edge", "semseg", "normals")}
    assert list(build_model(shuffled).tasks) == ["semseg", "normals", "edge", "depth"]
    theirs = authors_checkpoint("nyud4", seed=1)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    outs = []
    for tasks in (TASK_SETS["nyud4"], shuffled):
        net = load_authors_checkpoint(build_model(tasks), theirs).eval()
        with torch.no_grad():
            outs.append(net(x))
    for t in TASK_SETS["nyud4"]:
        torch.testing.assert_close(outs[0][t], outs[1][t], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["flat", "resume", "unprefixed"])
def test_both_file_layouts_load(tmp_path, layout):
    theirs = authors_checkpoint("nyud2")
    obj = {"flat": theirs, "unprefixed": {k.removeprefix("module."): v for k, v in theirs.items()},
           "resume": {"model": theirs, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7,
                      "best_result": {"semseg": {"mIoU": 0.4}}}}[layout]
    torch.save(obj, tmp_path / "best_model.pth.tar")
    net = load_authors_checkpoint(build_model(TASK_SETS["nyud2"]), tmp_path / "best_model.pth.tar")
    key = "heads.depth.last_layer.3.weight"
    assert torch.equal(net.heads.depth.aggregate.predict.weight, theirs["module." + key])


def _load(state, tasks="nyud2"):
    load_authors_checkpoint(build_model(TASK_SETS[tasks]), state)


def test_a_checkpoint_that_does_not_fit_names_the_first_offending_key(tmp_path):
    theirs = authors_checkpoint("nyud2")
    missing = dict(theirs)
    del missing["module.distillation_scale_2.cross_attention.depth.semseg.key_project.0.bn.running_mean"]
    with pytest.raises(AuthorsCheckpointError, match=r"cross_attention\.depth\.semseg\.key_project\.0\.bn\."
                                                      r"running_mean: missing"):
        _load(missing)
    extra = dict(theirs, **{"module.heads.semseg.upsample99.0.weight": torch.zeros(1)})
    with pytest.raises(AuthorsCheckpointError, match=r"upsample99\.0\.weight: no layer"):
        _load(extra)
    wrong = dict(theirs, **{"module.heads.semseg.last_layer.3.weight": torch.zeros(21, 1080, 1, 1)})
    with pytest.raises(AuthorsCheckpointError, match=r"last_layer\.3\.weight: shape \(21, 1080, 1, 1\)"):
        _load(wrong)
    key = "module.swTransform2.layers.0.blocks.1.attn.relative_position_index"
    with pytest.raises(AuthorsCheckpointError, match="blocks.1.attn.relative_position_index: not the relative"):
        _load(dict(theirs, **{key: window_index().flip(0)}))
    with pytest.raises(AuthorsCheckpointError,
                       match=r"tasks \['human_parts', 'sal', 'semseg'\], the network's for \['semseg', 'depth'\]"):
        _load(authors_checkpoint("pascal3"))
    with pytest.raises(AuthorsCheckpointError, match="does not exist"):
        read_authors_file(tmp_path / "nothing.pth.tar")
    with pytest.raises(AuthorsCheckpointError, match="map key strings to tensors"):
        _load(dict(theirs, **{"module.heads.semseg.last_layer.3.bias": 0.0}))
    with pytest.raises(TypeError, match="net must be an SCAMTL"):
        load_authors_checkpoint(torch.nn.Linear(2, 2), theirs)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(AuthorsCheckpointError, match="neither a state dict"):
        read_authors_file(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(AuthorsCheckpointError, match="cannot be read"):
        read_authors_file(tmp_path / "junk.pth")
    torch.save({"model": authors_checkpoint("nyud2"), "best_result": {"semseg": np.float64(0.4)}}, tmp_path / "np.pth")
    with pytest.raises(AuthorsCheckpointError, match="holds more than tensors .* allow_pickle=True"):
        read_authors_file(tmp_path / "np.pth")
    assert len(read_authors_file(tmp_path / "np.pth", allow_pickle=True)) == len(table("nyud2"))


def test_hrnet_release_weights_load_as_pretrained_backbone(tmp_path):
    """HRNet-Image-Classification's hrnet_w18_small_model_v2.pth: flat, unprefixed, with its classification
    head (dropped); the backbone rows of the authors' table without `module.backbone.` are its keys."""
    g = torch.Generator().manual_seed(3)
    backbone = {r["key"].removeprefix("module.backbone."): r for r in table("nyud2")
                if r["key"].startswith("module.backbone.")}
    state = {k: (torch.randint(0, 9, (), generator=g) if r["dtype"] == "int64" else
                 torch.randn([int(s) for s in r["shape"].split(",")], generator=g)) for k, r in backbone.items()}
    head = {"incre_modules.0.0.conv1.weight": torch.randn(32, 16, 1, 1), "downsamp_modules.0.0.weight": torch.randn(3),
            "final_layer.0.weight": torch.randn(2048, 1024, 1, 1), "classifier.weight": torch.randn(1000, 2048)}
    torch.save(dict(state, **head), tmp_path / "hrnet_w18_small_model_v2.pth")
    net = build_model(TASK_SETS["nyud2"], pretrained=tmp_path / "hrnet_w18_small_model_v2.pth")
    own = net.backbone.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k
