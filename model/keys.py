"""State-dict keys of layers that were nn.Sequential positions and are now named: checkpoints saved with the
positions still load (SCAMTL registers `upgrade_state_dict` as a load pre-hook).

The authors' released checkpoints name the same layers differently again, and their modules sit under other
names too; model/authors.py converts their files.
"""
from __future__ import annotations

# layer: {Sequential position: name now}; the authors' names for the same layers in the comments
RENAMED = {
    # GCA query and key: conv-BN-ReLU-conv-BN (authors: query_project.0.conv/.0.bn/.1.conv/.1.bn, key_project.*)
    "query": {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2"},
    "key": {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2"},
    # GCA value: conv-BN-ReLU (authors: value_project.conv/.bn)
    "value": {"0": "conv1", "1": "bn1"},
    # BasicBlock projection shortcut: conv-BN (authors: downsample.0/.1)
    "shortcut": {"0": "conv1", "1": "bn1"},
    # task head: conv-BN-ReLU-conv (authors: last_layer.0/.1/.3, the same positions)
    "aggregate": {"0": "conv", "1": "bn", "3": "predict"},
}


def upgrade_key(key: str) -> str:
    """`key` with each Sequential position of a layer in RENAMED replaced by the layer's name now."""
    parts = key.split(".")
    for i in range(len(parts) - 2):  # the last part names a tensor, not a layer
        parts[i + 1] = RENAMED.get(parts[i], {}).get(parts[i + 1], parts[i + 1])
    return ".".join(parts)


def upgrade_state_dict(module, state_dict, prefix, *_) -> None:
    """Load pre-hook: rename, in place, the keys under `prefix` that still use Sequential positions."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + upgrade_key(key[len(prefix):])
        if new != key:
            state_dict[new] = state_dict.pop(key)
