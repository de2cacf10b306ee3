"""Config loading and validation: messages name the key's path; errors come before any worker."""
import subprocess
import sys
from pathlib import Path

import pytest

from scaleforge.models import recipe_config_class
from scaleforge.platform.config import ConfigError, derive_layout, find_config, load_config

BIN = Path(sys.executable).parent


def load(*overrides, path="lm_tiny.yaml"):
    return load_config(path, list(overrides), recipe_config=recipe_config_class)


def test_shipped_config_found_in_configs_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config("lm_tiny.yaml").name == "lm_tiny.yaml"
    cfg = load()
    assert cfg.model.recipe == "llm" and cfg.trainer.max_steps == 40
    # inherited from base.yaml
    assert cfg.checkpoint.keep_last == 3 and cfg.metrics.wandb.mode == "offline"


def test_local_file_wins_over_configs_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lm_tiny.yaml").write_text("defaults: [lm_tiny.yaml]\ntrainer:\n  max_steps: 7\n")
    with pytest.raises(ConfigError, match="circular"):
        load()
    (tmp_path / "lm_tiny.yaml").write_text("model:\n  recipe: llm\ntrainer:\n  max_steps: 7\n")
    assert load().trainer.max_steps == 7


def test_inheritance_and_override_order(tmp_path):
    (tmp_path / "child.yaml").write_text("defaults: [lm_tiny.yaml]\ntrainer:\n  max_steps: 5\n")
    cfg = load("trainer.max_steps=9", path=str(tmp_path / "child.yaml"))
    assert cfg.trainer.max_steps == 9 and cfg.model.seq_len == 128


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as e:
        load("trainer.max_stepz=20")
    assert str(e.value) == "trainer.max_stepz: unknown key; did you mean trainer.max_steps?"


def test_removed_dead_trainer_keys_are_unknown():
    """trainer.checkpoint_interval (checkpoint.interval is the one the trainer honours) and
    trainer.eval_interval (there is no eval loop) were accepted and ignored; now they are errors."""
    with pytest.raises(ConfigError, match=r"^trainer.checkpoint_interval: unknown key"):
        load("trainer.checkpoint_interval=5")
    with pytest.raises(ConfigError, match=r"^trainer.eval_interval: unknown key"):
        load("trainer.eval_interval=5")


def test_unknown_key_in_recipe_section():
    with pytest.raises(ConfigError, match=r"^model.seq_lenn: unknown key; did you mean model.seq_len\?"):
        load("model.seq_lenn=3")


def test_unknown_section():
    with pytest.raises(ConfigError, match="^trainr: unknown section; did you mean trainer"):
        load("trainr.max_steps=3")


def test_wrong_type_names_path_type_and_value():
    with pytest.raises(ConfigError) as e:
        load("trainer.max_steps=many")
    msg = str(e.value)
    assert msg.startswith("trainer.max_steps: expected int") and "'many'" in msg


def test_bad_choice():
    with pytest.raises(ConfigError, match=r"parallel.engine: 'zero9' is not one of fsdp2, deepspeed"):
        load("parallel.engine=zero9")


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="model.recipe: unknown recipe 'lmm'; did you mean llm"):
        load("model.recipe=lmm")


def test_batch_arithmetic():
    cfg = load("trainer.global_batch_size=16", "trainer.micro_batch_size=4")
    layout = derive_layout(cfg, 2)
    assert (layout.grad_accum, layout.dp_shard, layout.dp_replicate) == (2, 2, 1)
    cfg = load("trainer.global_batch_size=10", "trainer.micro_batch_size=4")
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not divisible by .*micro_batch_size \(4\) x "
                                          r"data-parallel size \(2\) = 8"):
        derive_layout(cfg, 2)


def test_mesh_must_cover_world():
    cfg = load("parallel.dp_shard=4", "trainer.global_batch_size=32")
    with pytest.raises(ConfigError, match="the job has 2"):
        derive_layout(cfg, 2)
    cfg = load("parallel.dp_replicate=2", "parallel.dp_shard=2", "trainer.global_batch_size=32")
    assert derive_layout(cfg, 4).dp_size == 4


def _launch(*args, cwd=None):
    return subprocess.run([str(BIN / "launch"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    r = _launch("--config", "lm_tiny.yaml", "trainer.max_stepz=20", f"run.output_dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: trainer.max_stepz: unknown key; did you mean trainer.max_steps?"
    assert "Traceback" not in r.stderr and not (tmp_path / "lm_tiny").exists()


def test_cli_impossible_mesh_before_workers(tmp_path):
    r = _launch("--config", "lm_tiny.yaml", "--nproc", "3", f"run.output_dir={tmp_path}")
    assert r.returncode == 2 and "is not divisible" in r.stderr and "Traceback" not in r.stderr


def test_print_config_resolves_overrides(tmp_path):
    r = _launch("--config", "lm_tiny.yaml", "--print-config", "run.name=foo", "--nproc", "2")
    assert r.returncode == 0, r.stderr
    assert "name: foo" in r.stdout and "procs_per_node: 2" in r.stdout and "recipe: llm" in r.stdout


def test_missing_config_file_suggests():
    r = _launch("--config", "lm_tin.yaml")
    assert r.returncode == 2 and "did you mean lm_tiny.yaml" in r.stderr


def test_dry_run_plan():
    r = _launch("--config", "lm_1b.yaml", "--dry-run", "--nproc", "8")
    assert r.returncode == 0, r.stderr
    assert "world size        8" in r.stdout and "accumulation 1" in r.stdout
    assert "memory / device" in r.stdout and "parameters" in r.stdout


def test_malformed_overrides_are_config_errors():
    with pytest.raises(ConfigError, match="bad override .not valid YAML"):
        load("data.sources=[{name: a, shards: x{0..3}.tar}]")
    with pytest.raises(ConfigError, match="lists are replaced whole"):
        load("data.sources.1.shards=[x]")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load("trainer.max_steps")


def test_source_shards_may_be_one_pattern():
    cfg = load("data.kind=webdataset", "data.sources=[{name: a, shards: 'x-{0..3}.tar'}]")
    assert cfg.data.sources[0].shards == ["x-{0..3}.tar"]


def test_yaml11_words_stay_text_in_str_fields():
    cfg = load("run.name=off", "parallel.compile=yes")
    assert cfg.run.name == "off"  # not the str of YAML 1.1's bool False
    assert cfg.parallel.compile is True  # bool fields still take on/off/yes/no
    assert load("parallel.compile=off").parallel.compile is False
