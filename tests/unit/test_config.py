"""The config tree: every file loads, every field is documented, bad input is one line and exit 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest

from ctxtrain import cli
from ctxtrain.config import Config, ConfigError, field_docs, load_config, to_yaml
from tests.conftest import CONFIGS
from tests.helpers import load_shipped


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path, tmp_path):
    cfg = load_shipped(path, tmp_path)
    assert isinstance(cfg, Config)
    # What `config show` prints loads back to the same tree.
    (tmp_path / "shown.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "shown.yaml") == cfg


def test_every_field_has_a_docstring():
    sections = [Config] + list(typing.get_type_hints(Config).values())
    for cls in sections:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_overrides_are_typed(tmp_path):
    cfg = load_config(CONFIGS / "lm_tiny.yaml", ["--model.n_layers=3", "--optim.lr=3e-4",
                                                 "--train.stop_at_step=null",
                                                 "--tracking.tags=a,b", "--zero.offload_optimizer=true"])
    assert cfg.model.n_layers == 3 and cfg.optim.lr == 3e-4 and cfg.train.stop_at_step is None
    assert cfg.tracking.tags == ["a", "b"] and cfg.zero.offload_optimizer is True
    # The printed YAML loads back to the same config.
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, field",
    [
        ("--model.n_heads=7", "model.n_heads"),
        ("--optim.lr=-0.1", "optim.lr"),
        ("--model.n_layer=3", "model.n_layer"),
        ("--train.max_steps=many", "train.max_steps"),
        ("--train.dtype=fp8", "train.dtype"),
        ("--zero.stage=4", "zero.stage"),
        ("--model.n_kv_heads=3", "model.n_kv_heads"),
        ("--train.stop_at_step=5000", "train.stop_at_step"),
        ("--fault.kill_rank=5", "fault.kill_rank"),
        ("--memory.checkpoint=some", "memory.checkpoint"),
        ("--memory.loss_chunk=-8", "memory.loss_chunk"),
        ("--memory.margin=1.5", "memory.margin"),
        ("--parallel.sp=3", "parallel.sp=3 must divide cluster.workers=2, model.n_heads=4"),
        ("--parallel.sp=0", "parallel.sp"),
    ],
)
def test_bad_config_is_one_line_exit_2(override, field, capsys):
    rc = cli.main(["config", "show", str(CONFIGS / "lm_tiny.yaml"), override])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert field in err


@pytest.mark.parametrize("config, override, says", [
    ("translate_tiny.yaml", "--data.pack_pairs=32", "a row must hold the longest pair"),
    ("lm_tiny.yaml", "--data.pack_pairs=128", "packs translation pairs"),
    ("translate_tiny.yaml", "--data.pack_pairs=-1", "data.pack_pairs=-1: must be 0 or more"),
])
def test_bad_pair_packing_is_one_line_exit_2(config, override, says, capsys):
    rc = cli.main(["config", "show", str(CONFIGS / config), override])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and says in err, err


def test_a_read_fault_on_a_rank_that_reads_nothing_is_refused(capsys):
    """Under parallel.sp only the first rank of each group reads data: a kill during a read elsewhere would
    never fire."""
    rc = cli.main(["config", "show", str(CONFIGS / "lm_tiny.yaml"), "--parallel.sp=2", "--fault.kill_rank=1",
                   "--fault.at_step=3", "--fault.during=read"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "only the first rank of each group" in err


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    assert cli.main(["config", "show", str(tmp_path / "bad.yaml")]) == 2
    assert cli.main(["config", "show", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "bad.yaml" in err[0] and "none.yaml" in err[1]


def test_deprecated_activation_checkpointing_still_works_with_one_line(tmp_path, capsys):
    (tmp_path / "old.yaml").write_text("train:\n  activation_checkpointing: true\n")
    cfg = load_config(tmp_path / "old.yaml")
    err = capsys.readouterr().err.strip().splitlines()
    assert cfg.memory.checkpoint == "full" and not hasattr(cfg.train, "activation_checkpointing")
    assert len(err) == 1 and "deprecated" in err[0] and "memory.checkpoint=full" in err[0]
    assert load_config(tmp_path / "old.yaml", ["--memory.checkpoint=full"]).memory.checkpoint == "full"
    with pytest.raises(ConfigError, match="contradicts memory.checkpoint=selective"):
        load_config(tmp_path / "old.yaml", ["--memory.checkpoint=selective"])
    assert load_config(None, ["--train.activation_checkpointing=false"]).memory.checkpoint == "none"


def test_sequence_parallel_is_refused_for_the_encoder_decoder(capsys):
    assert cli.main(["config", "show", str(CONFIGS / "translate_tiny.yaml"), "--parallel.sp=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.sp=2" in err[0] and "decoder-only" in err[0]
    cfg = load_config(CONFIGS / "lm_tiny.yaml", ["--parallel.sp=2", "--data.seq_len=512"])
    assert cfg.parallel.sp == 2


def test_config_error_carries_field_name():
    with pytest.raises(ConfigError, match="model.d_model"):
        load_config(None, ["--model.d_model=0"])


def test_cli_command_end_to_end():
    """The installed command itself: the override shows up, and a bad one exits 2 with one line."""
    out = subprocess.run([sys.executable, "-m", "ctxtrain", "config", "show", str(CONFIGS / "lm_tiny.yaml"),
                          "--model.n_layers=3"], capture_output=True, text=True)
    assert out.returncode == 0
    model_section = out.stdout.split("data:")[0]
    assert "n_layers: 3" in model_section
    bad = subprocess.run([sys.executable, "-m", "ctxtrain", "config", "show", str(CONFIGS / "lm_tiny.yaml"),
                          "--model.n_heads=7"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "model.n_heads" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "ctxtrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in cli.VERBS:
        assert verb in out.stdout
