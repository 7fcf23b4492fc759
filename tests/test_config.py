"""Config files: every shipped config loads, paper values, inheritance, and one-line errors for bad keys/values."""
import pytest

from model.config import DEFAULTS, ConfigError, available_configs, load_config, supervised_tasks


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg["name"] == name and supervised_tasks(cfg)


def test_paper_configs_hold_the_paper_values():
    nyud = load_config("nyud_semseg_depth")
    assert (nyud["size"], nyud["batch_size"], nyud["epochs"]) == ([480, 640], 8, 100)
    assert nyud["loss_weights"] == {"semseg": 1.44, "depth": 1.15}
    pascal = load_config("pascal_semseg_parts_sal.yaml")
    assert (pascal["size"], pascal["batch_size"], pascal["epochs"]) == ([512, 512], 8, 80)
    assert pascal["loss_weights"] == {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0}
    for cfg in (nyud, pascal):
        assert (cfg["lr"], cfg["weight_decay"], cfg["poly_power"], cfg["schedule_unit"]) == (1e-4, 1e-4, 0.9, "epoch")
    assert len(load_config("nyud_all")["tasks"]) == 4 and len(load_config("pascal_all")["tasks"]) == 5


def test_single_task_baseline_supervises_one_task():
    cfg = load_config("nyud_depth_only")
    assert cfg["loss_weights"] == {"semseg": 0.0, "depth": 1.0}
    assert supervised_tasks(cfg) == ["depth"]
    assert cfg["size"] == [480, 640]        # inherited from the paper config


def test_base_is_merged_under_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "base: synthetic\nbatch_size: 3\n"))
    assert cfg["batch_size"] == 3 and cfg["widths"] == load_config("synthetic")["widths"]


def test_unknown_key_names_the_key_and_the_allowed_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "base: synthetic\nlearning_rate: 0.1\n"))
    msg = str(e.value)
    assert "learning_rate" in msg and "allowed keys" in msg and all(k in msg for k in DEFAULTS)
    assert "\n" not in msg


@pytest.mark.parametrize("text, words", [
    ("tasks: [semseg, flow]", ["flow", "available"]),
    ("tasks: [semseg]", ["at least 2 tasks", "loss weight 0"]),
    ("loss_weights: {sal: 1}", ["sal", "not in tasks"]),
    ("loss_weights: {semseg: 0, depth: 0, normals: 0, edge: 0}", ["nothing would be trained"]),
    ("batch_size: 0", ["batch_size", "positive"]),
    ("lr: fast", ["lr", "number"]),
    ("dataset: coco", ["dataset", "coco"]),
    ("size: 16", ["size", ">= 32"]),
    ("widths: [10, 20, 40, 80]", ["widths"]),
    ("schedule_unit: week", ["schedule_unit"]),
    ("fused: 1", ["fused", "true or false"]),
])
def test_bad_values_are_one_line_errors(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f"base: synthetic\n{text}\n"))
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    assert "\n" not in msg


def test_missing_config_lists_the_available_names():
    with pytest.raises(ConfigError, match="synthetic"):
        load_config("no_such_config")


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
