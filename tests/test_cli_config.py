"""The `mmalign` command and typed configs: help, unbuilt subcommands, config errors named by key and file."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmalign.cli import SUBCOMMANDS, main
from mmalign.config import ConfigError, apply_overrides, load_config, write_resolved_config
from mmalign.t2i.task import T2ITrainConfig

MINIMAL = {
    "model": {"pretrained": "some/model"},
    "data": {"shards": "data/pairs", "resolution": 32},
    "train": {"max_steps": 3},
}


def write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ["train", "score", "guide", "selfgen", "shards", "eval", "quickstart", "bench"]:
        assert name in out


def test_console_script_help_runs_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "mmalign.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "quickstart" in proc.stdout


def test_unbuilt_subcommands_say_what_is_missing_and_exit_2(capsys, monkeypatch):
    import mmalign.cli as cli

    unbuilt = cli.Subcommand("someday", "a command not built yet", None, "the someday capability")
    monkeypatch.setattr(cli, "SUBCOMMANDS", (*SUBCOMMANDS, unbuilt))
    assert main(["someday", "extra", "args"]) == 2
    err = capsys.readouterr().err
    assert "not built yet" in err and unbuilt.missing in err


def test_overrides_parse_yaml_scalars_and_make_sections():
    data, touched = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=1e-5", "train.max_steps=7", "a.b.c=[1, 2]"])
    assert data["optim"]["lr"] == 1e-5 and data["train"]["max_steps"] == 7 and data["a"]["b"]["c"] == [1, 2]
    assert touched == {"optim.lr", "train.max_steps", "a.b.c"}


def test_load_config_applies_overrides_and_defaults(tmp_path):
    cfg = load_config(T2ITrainConfig, write(tmp_path, MINIMAL), ["optim.lr=1e-5", "method.name=mapo"])
    assert cfg.optim.lr == 1e-5 and cfg.method.name == "mapo" and cfg.method.resolved_beta() == 0.1
    assert cfg.train.max_steps == 3 and cfg.run.seed == 0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(T2ITrainConfig, write(tmp_path, MINIMAL), ["data.schema=pair", "method.beta=2500"])
    path = write_resolved_config(cfg, tmp_path / "run")
    again = load_config(T2ITrainConfig, path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["data"]["schema"] == "pair"


@pytest.mark.parametrize(
    "mutate, overrides, expected",
    [
        (lambda d: d["train"].update(max_stepz=3), [], "unknown key 'train.max_stepz'"),
        (lambda d: d["data"].pop("shards"), [], "missing required key 'data.shards'"),
        (lambda d: d["train"].update(max_steps="many"), [], "key 'train.max_steps'"),
        (lambda d: None, ["optim.lrr=1"], "command line: unknown key 'optim.lrr'"),
        (lambda d: None, ["optim.lr=abc"], "command line: key 'optim.lr'"),
        (lambda d: None, ["method.loss_type=sigmoidd"], "loss_type 'sigmoidd' is not one of"),
        (lambda d: None, ["data.resolution=30"], "not a multiple of 8"),
        (lambda d: None, ["method.name=rankdpo"], "needs data.schema 'ranked'"),
    ],
)
def test_config_errors_name_the_key_and_the_file(tmp_path, mutate, overrides, expected):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(T2ITrainConfig, path, overrides)
    assert expected in str(exc.value)
    if not overrides:
        assert str(path) in str(exc.value)


@pytest.mark.parametrize("overrides, expected", [
    ([], "unknown key 'train.max_stepz'"),
    (["optim.lr=abc"], "key 'optim.lr'"),
])
def test_config_errors_through_the_cli(tmp_path, capsys, overrides, expected):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    if not overrides:
        data["train"]["max_stepz"] = 1
    path = write(tmp_path, data)
    assert main(["train", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert expected in err and "invalid config" in err
    assert (str(path) in err) or ("command line" in err)


def test_cli_print_config(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    assert main(["train", str(path), "--print-config", "optim.lr=2e-6"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 2e-6 and printed["method"]["name"] == "dpo"


def test_missing_config_file_is_a_clear_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cache_only_names_missing_shards_and_refuses_several_processes(tmp_path, capsys, monkeypatch):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["model"]["pretrained"] = str(Path(__file__).resolve().parents[1] / "assets" / "tiny" / "sd15")
    data["data"]["shards"] = str(tmp_path / "no_shards")
    path = write(tmp_path, data)
    assert main(["train", str(path), "--cache-only"]) == 2
    err = capsys.readouterr().err
    assert "mmalign train --cache-only" in err and str(tmp_path / "no_shards") in err and "no such shard" in err
    assert "Loading weights" not in err  # the data is checked before any model loads
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(path), "--cache-only"]) == 2
    assert "run it in one process" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path, umask):
    import os
    import stat

    from mmalign.config import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.json", "{}\n")
        with open(tmp_path / "plain.json", "w") as fh:
            fh.write("{}\n")
        written = write_resolved_config(T2ITrainConfig.model_validate(MINIMAL), tmp_path / "run")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "atomic.json").read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    import stat

    from mmalign.config import atomic_write_text

    path = tmp_path / "shared.yaml"
    path.write_text("old\n")
    path.chmod(0o640)
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_cli_drops_only_the_torchvision_fallback_warning(capsys, caplog):
    import logging

    with pytest.raises(SystemExit):  # main() installs the filter before parsing
        main(["train", "--help"])
    log = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger="transformers.utils.import_utils"):
        log.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        log.warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something else"]


def test_comma_choices_parses_a_subset_and_names_the_flag_and_the_valid_values_otherwise():
    from mmalign.cli import comma_choices

    assert comma_choices("--methods", " dpo, sft ,", ("sft", "dpo")) == ["dpo", "sft"]
    assert comma_choices("--curve-methods", "", ("sft",), allow_empty=True) == []
    for bad in ("ppo", "dpo,ppo", "", " , "):
        with pytest.raises(ValueError, match=r"--methods '.*': valid are sft, dpo$"):
            comma_choices("--methods", bad, ("sft", "dpo"))
