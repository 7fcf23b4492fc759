"""The authors' SCA-MTL checkpoints (github.com/kimsunkyung/SCA_MTL): their state-dict keys mapped to ours.

`load_authors_checkpoint(net, path)` loads a `best_model.pth.tar` (a flat state dict) or a `checkpoint.pth.tar`
(a dict with a `model` entry), with or without DataParallel's `module.` prefix; `authors_state_dict(net)` writes
ours back in their layout. The map is strict: every key of theirs is mapped or listed in DROPPED with the reason,
every shape equal; anything else is an AuthorsCheckpointError naming the first offending key.

Which of their layers is which of ours (docs/architecture.md has the table with each layer's role):
  backbone.*                                   backbone.*  (the same HRNet names)
  swTransform{k+1}                             self_attention.k          Swin of scale k
  scale_k.refinement.<t>.{0,1}, .decoders.<t>  initial.k.<t>.blocks.{0,1}, .predict
  distillation_scale_k.cross_attention.<t>.<a> cross_task.k.attention.<t>_from_<a>   target t reads source a
  distillation_scale_k.dimensionality_reduction cross_task.k.block       one block shared by all targets
  fpm_scale_k.swtf / .dimensionality_reduction / .se.<t>   propagation.k.attention / .block / .excite.<t>
  heads.<t>.cross_scale_attention{k}           heads.<t>.attention.k     CSAM of target scale k
  heads.<t>.upsample{j}{k}                     heads.<t>.projection.k_from_j   scale j's map projected to C_k
  heads.<t>.last_layer.{0,1,3}                 heads.<t>.aggregate.{conv,bn,predict}
and inside the blocks: patch_embed.proj/.norm, layers.0.blocks.i, norm0 -> embed, embed_norm, blocks.i, norm;
{query,key}_project.{0,1}.{conv,bn} -> {query,key}.{conv1,bn1,conv2,bn2}; value_project.{conv,bn} -> value.{conv1,bn1};
downsample.{0,1} -> shortcut.{conv1,bn1}; se squeeze.{0,2} -> fc1, fc2.
Their modules concatenate tasks in TASK_ORDER, which SCAMTL always uses, so no weight needs permuting.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .network import SCAMTL

PREFIX = "module."  # both of their scripts save the DataParallel-wrapped model
TABLE, INDEX = "relative_position_bias_table", "relative_position_index"

# their keys with no counterpart here, and why loading may skip them
DROPPED = {
    r"\.norm2\.(weight|bias)$": "the Swin blocks' MLP LayerNorm; their forward pass never uses it (the MLP was removed)",
    r"\.attn\.relative_position_index$": "a fixed buffer of the 7x7 window; checked equal to ours, not stored here",
}

_SWIN = (("embed", "patch_embed.proj"), ("embed_norm", "patch_embed.norm"), ("blocks", "layers.0.blocks"),
         ("norm", "norm0"))
_BLOCK = (("shortcut.conv1", "downsample.0"), ("shortcut.bn1", "downsample.1"))
_GCA = (("query.conv1", "query_project.0.conv"), ("query.bn1", "query_project.0.bn"),
        ("query.conv2", "query_project.1.conv"), ("query.bn2", "query_project.1.bn"),
        ("key.conv1", "key_project.0.conv"), ("key.bn1", "key_project.0.bn"),
        ("key.conv2", "key_project.1.conv"), ("key.bn2", "key_project.1.bn"),
        ("value.conv1", "value_project.conv"), ("value.bn1", "value_project.bn"))


class AuthorsCheckpointError(ValueError):
    """An authors' checkpoint does not fit the network: the message names the first offending key."""


def module_map(net: SCAMTL) -> list:
    """(our module prefix, theirs) for every module whose name differs; a key takes its longest matching prefix."""
    tasks = list(net.tasks)
    pairs = []

    def inside(ours, theirs, renames=()):
        pairs.append((ours, theirs))
        pairs.extend((f"{ours}.{a}", f"{theirs}.{b}") for a, b in renames)

    for k in range(4):
        inside(f"self_attention.{k}", f"swTransform{k + 1}", _SWIN)
        for t in tasks:
            for i in range(2):
                inside(f"initial.{k}.{t}.blocks.{i}", f"scale_{k}.refinement.{t}.{i}", _BLOCK)
            inside(f"initial.{k}.{t}.predict", f"scale_{k}.decoders.{t}")
            for a in tasks:
                if a != t:
                    inside(f"cross_task.{k}.attention.{t}_from_{a}", f"distillation_scale_{k}.cross_attention.{t}.{a}",
                           _GCA)
        inside(f"cross_task.{k}.block", f"distillation_scale_{k}.dimensionality_reduction", _BLOCK)
        if k > 0:
            inside(f"propagation.{k}.attention", f"fpm_scale_{k}.swtf", _SWIN)
            inside(f"propagation.{k}.block", f"fpm_scale_{k}.dimensionality_reduction", _BLOCK)
            for t in tasks:
                inside(f"propagation.{k}.excite.{t}", f"fpm_scale_{k}.se.{t}", (("fc1", "squeeze.0"), ("fc2", "squeeze.2")))
    for t in tasks:
        for k in range(3):
            inside(f"heads.{t}.attention.{k}", f"heads.{t}.cross_scale_attention{k}", _GCA)
            for j in range(k + 1, 4):
                inside(f"heads.{t}.projection.{k}_from_{j}", f"heads.{t}.upsample{j}{k}")
        inside(f"heads.{t}.aggregate", f"heads.{t}.last_layer", (("conv", "0"), ("bn", "1"), ("predict", "3")))
    return pairs


def key_map(net: SCAMTL) -> dict:
    """{their key (without `module.`): our key} for every tensor of net.state_dict()."""
    theirs_of = dict(module_map(net))
    out = {}
    for key in net.state_dict():
        parts = key.split(".")
        # the longest module prefix of the key that the map names (backbone keys have none: same names)
        ours = next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if p in theirs_of), "")
        if not ours and parts[0] != "backbone":
            raise AssertionError(f"model/authors.py maps no module of {key}")  # a new layer needs a line above
        out[(theirs_of[ours] + key[len(ours):]) if ours else key] = key
    return out


def _dropped_reason(key: str):
    return next((why for pattern, why in DROPPED.items() if re.search(pattern, key)), None)


def read_authors_file(path, allow_pickle: bool = False) -> dict:
    """Their state dict from `best_model.pth.tar` (flat) or `checkpoint.pth.tar` ({"model": ...}), prefix stripped."""
    path = Path(path)
    if not path.is_file():
        raise AuthorsCheckpointError(f"authors' checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        why = " ".join(str(e).split())
        if "Unsupported global" in why:  # e.g. numpy scalars among a resume file's metrics
            raise AuthorsCheckpointError(
                f"authors' checkpoint {path} holds more than tensors ({why[why.index('Unsupported global'):][:120]}); "
                "if you trust the file, pass allow_pickle=True (--allow-pickle)") from None
        raise AuthorsCheckpointError(f"authors' checkpoint {path} cannot be read: {type(e).__name__}: "
                                     f"{why[:200]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not _is_state_dict(state):
        raise AuthorsCheckpointError(f"{path} is neither a state dict nor a dict with a 'model' state dict")
    return state


def _is_state_dict(state) -> bool:
    return isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())


def convert_authors_state_dict(state: dict, net: SCAMTL) -> dict:
    """Their state dict (keys with or without `module.`) as ours, checked strictly against `net`."""
    if not isinstance(net, SCAMTL):
        raise TypeError(f"net must be an SCAMTL (model.build_model), got {type(net).__name__}")
    if not _is_state_dict(state):
        raise AuthorsCheckpointError("the authors' state dict must map key strings to tensors")
    mapping = key_map(net)
    own = net.state_dict()
    fixed = {name: buf for name, buf in net.named_buffers() if name.endswith("relative_position_index")}
    bare_keys = [k.removeprefix(PREFIX) for k in state]
    heads = {k.split(".")[1] for k in bare_keys if k.startswith("heads.")}
    if heads != set(net.tasks):
        raise AuthorsCheckpointError(f"the checkpoint's heads are for tasks {sorted(heads)}, the network's for "
                                     f"{list(net.tasks)}: build it with those tasks")
    out = {}
    for (key, value), bare in zip(state.items(), bare_keys):
        if bare in mapping:
            ours = mapping[bare]
            if tuple(value.shape) != tuple(own[ours].shape):
                raise AuthorsCheckpointError(f"{key}: shape {tuple(value.shape)}, the network's {ours} has "
                                             f"{tuple(own[ours].shape)} (another task set or widths?)")
            out[ours] = value
        elif bare.endswith(INDEX):
            table = mapping.get(bare[: -len(INDEX)] + TABLE, "")
            ours = table[: -len(TABLE)] + INDEX
            if ours not in fixed or not torch.equal(value.to(fixed[ours].device), fixed[ours]):
                raise AuthorsCheckpointError(f"{key}: not the relative position index of a 7x7 window")
        elif _dropped_reason(bare) is None:
            raise AuthorsCheckpointError(f"{key}: no layer of this network has it (tasks {list(net.tasks)})")
    missing = [k for k in mapping if mapping[k] not in out]
    if missing:
        raise AuthorsCheckpointError(f"{PREFIX}{missing[0]}: missing from the checkpoint "
                                     f"({len(missing)} missing; tasks {list(net.tasks)})")
    return out


def load_authors_checkpoint(net: SCAMTL, source, allow_pickle: bool = False) -> SCAMTL:
    """Load the authors' weights (a path or an already loaded state dict) into `net`; returns `net`."""
    state = source if isinstance(source, dict) else read_authors_file(source, allow_pickle)
    net.load_state_dict(convert_authors_state_dict(state, net))
    return net


def authors_state_dict(net: SCAMTL) -> dict:
    """net's weights in the authors' layout, `module.` included: their eval script loads it strictly."""
    own = dict(net.state_dict(), **dict(net.named_buffers()))
    theirs_of = {ours: theirs for theirs, ours in key_map(net).items()}
    out = {}
    for ours, theirs in theirs_of.items():
        out[PREFIX + theirs] = own[ours]
        if ours.endswith(TABLE):  # the fixed index beside each bias table
            out[PREFIX + theirs[: -len(TABLE)] + INDEX] = own[ours[: -len(TABLE)] + INDEX]
        elif ours.endswith(".norm1.weight") and ".blocks." in ours:  # their unused norm2, at its initial values
            out[PREFIX + theirs.replace(".norm1.weight", ".norm2.weight")] = torch.ones_like(own[ours])
            out[PREFIX + theirs.replace(".norm1.weight", ".norm2.bias")] = torch.zeros_like(own[ours])
    return out
