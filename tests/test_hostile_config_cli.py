"""Hostile configs and command lines: every numeric setting validated with its key named, config errors that
name the keys at fault without dumping the input, `--help` without torch, and refusals of `mmalign train` that
reach the user as one line and exit code 2 (no traceback)."""

import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml

from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.train.tasks import load_train_config

REPO = Path(__file__).resolve().parents[1]
TINY_SD15 = REPO / "assets" / "tiny" / "sd15"
TINY_PAIRS = REPO / "assets" / "tiny" / "pairs"

RECIPES = {
    "t2i": {"task": "t2i", "model": {"pretrained": str(TINY_SD15)},
            "data": {"shards": str(TINY_PAIRS), "resolution": 32}, "train": {"max_steps": 1}},
    "vlm": {"task": "vlm", "model": {"pretrained": "some/vlm"}, "data": {"shards": "some/shards"},
            "train": {"max_steps": 1}},
    "reward": {"task": "reward", "model": {"pretrained": "tiny"}, "data": {"shards": "some/shards"},
               "train": {"max_steps": 1}},
}


def write_recipe(tmp_path: Path, task: str) -> Path:
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(RECIPES[task]))
    return path


# -- 1. every numeric setting is validated, before any model loads ---------------------------------------------------
BAD_NUMBERS = [
    # (task, override, the key the error must name)
    ("t2i", "optim.max_grad_norm=-1", "optim.max_grad_norm"),  # clipping by a negative norm trains backwards
    ("t2i", "optim.max_grad_norm=0", "optim.max_grad_norm"),
    ("t2i", "optim.betas=[2, 0.5]", "optim.betas.0"),
    ("t2i", "optim.betas=[0.9, 1.0]", "optim.betas.1"),
    ("t2i", "optim.betas=[-0.1, 0.9]", "optim.betas.0"),
    ("t2i", "optim.eps=-1", "optim.eps"),
    ("t2i", "optim.eps=0", "optim.eps"),
    ("t2i", "optim.lr=.inf", "optim.lr"),
    ("t2i", "optim.weight_decay=.inf", "optim.weight_decay"),
    ("t2i", "run.seed=-1", "run.seed"),
    ("t2i", "validation.guidance_scale=.nan", "validation.guidance_scale"),
    ("t2i", "method.beta=.inf", "method.beta"),
    ("t2i", "method.mapo_snr_value=.inf", "method.mapo_snr_value"),
    ("t2i", "model.lora.alpha=-16", "model.lora.alpha"),
    ("t2i", "validation.guidance_scale=.inf", "validation.guidance_scale"),
    ("t2i", "validation.seed=-3", "validation.seed"),
    ("vlm", "method.beta=.inf", "method.beta"),
    ("vlm", "method.sft_weight=.inf", "method.sft_weight"),
    ("vlm", "model.lora.alpha=.inf", "model.lora.alpha"),
    ("vlm", "method.rejected_images_weight=.inf", "method.rejected_images_weight"),
    ("vlm", "optim.max_grad_norm=-1", "optim.max_grad_norm"),
    ("reward", "method.btt_k=.inf", "method.btt_k"),
    ("reward", "model.max_logit_scale=.inf", "model.max_logit_scale"),
    ("reward", "data.frames.fps=-2", "data.frames.fps"),
    ("reward", "data.frames.max_frames=0", "data.frames.max_frames"),
]


@pytest.mark.parametrize("task, override, key", BAD_NUMBERS, ids=[f"{t}:{o}" for t, o, _ in BAD_NUMBERS])
def test_out_of_range_and_non_finite_numbers_are_refused_naming_the_key(tmp_path, task, override, key):
    with pytest.raises(ConfigError) as exc:
        load_train_config(write_recipe(tmp_path, task), [override])
    msg = str(exc.value)
    assert f"key {key!r}" in msg and msg.startswith("command line:"), msg
    assert len(msg.splitlines()) == 1, msg


def test_the_valid_edges_of_the_ranges_are_accepted(tmp_path):
    cfg = load_train_config(write_recipe(tmp_path, "t2i"), ["optim.betas=[0.0, 0.999]", "optim.max_grad_norm=null",
                                                           "optim.weight_decay=0", "run.seed=0"])
    assert cfg.optim.betas == (0.0, 0.999) and cfg.optim.max_grad_norm is None and cfg.optim.weight_decay == 0


# -- 2. validators over several keys name them and stop --------------------------------------------------------------
MODEL_LEVEL = [
    # (override, keys the message must name): a config-level validator, then a section-level one
    ("data.resolution=30", ["data.resolution"]),
    ("method.name=rankdpo", ["method.name", "data.schema"]),
    ("method.ties=keep", ["ties"]),
]


@pytest.mark.parametrize("override, keys", MODEL_LEVEL, ids=[o for o, _ in MODEL_LEVEL])
def test_a_validator_error_names_the_keys_without_dumping_the_input(tmp_path, override, keys):
    with pytest.raises(ConfigError) as exc:
        load_train_config(write_recipe(tmp_path, "t2i"), [override])
    msg = str(exc.value)
    assert all(k in msg for k in keys), msg
    assert "(got {" not in msg and "'pretrained'" not in msg and "max_steps" not in msg, msg
    assert "Value error" not in msg and "<top level>" not in msg, msg
    assert override.split("=")[0] in msg.split(":")[0] or "command line" in msg.split(":")[0], msg
    assert len(msg.splitlines()) == 1, msg


# -- 3. help and argument errors answer without torch ------------------------------------------------------------------
_HELP_SCRIPT = textwrap.dedent("""
    import argparse, contextlib, io, json, sys
    from mmalign.cli import build_parser, main

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield (*prefix, name)
                    yield from commands(sub, (*prefix, name))

    tries = [["--help"], [], ["--no-such-flag"], ["no-such-command"], ["train"], ["train", "x.yaml", "--bogus"]]
    tries += [[*c, "--help"] for c in commands(build_parser())]
    tries += [[*c, "--no-such-flag"] for c in commands(build_parser())]
    heavy = {}
    for argv in tries:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv)
            except SystemExit:
                pass
        loaded = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        if loaded:
            heavy[" ".join(argv)] = loaded
            break
    print(json.dumps({"tried": len(tries), "heavy": heavy}))
""")


def test_help_and_argument_errors_do_not_import_torch_diffusers_or_transformers():
    proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tried"] > 20  # the top level, every sub-command and every nested one
    assert result["heavy"] == {}, f"these imported heavy libraries: {result['heavy']}"


# -- 4. refusals of `mmalign train`: one line, exit code 2, no traceback -------------------------------------------
def train_fails(capsys, config: Path, *overrides: str) -> str:
    rc = main(["train", str(config), "train.progress=false", *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    # transformers draws a progress bar while the model loads (the strict-mode case); the rest is ours
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("mmalign train: "), err
    return lines[0]


@pytest.fixture
def pairs(tmp_path) -> Path:
    out = tmp_path / "pairs"
    shutil.copytree(TINY_PAIRS, out)
    return out


@pytest.fixture
def recipe(tmp_path, pairs) -> Path:
    data = RECIPES["t2i"] | {"data": {"shards": str(pairs), "resolution": 32, "shuffle_buffer": 0},
                             "run": {"output_dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("url", ["pipe:cat /etc/passwd", "http://example.invalid/shard-{000000..000001}.tar"])
def test_unsafe_shard_urls_are_refused(capsys, recipe, url):
    err = train_fails(capsys, recipe, f"data.shards={url}")
    assert url.split("{")[0][:12] in err and "refused" in err


def test_a_binary_config_file_is_refused_naming_it(capsys, tmp_path):
    config = tmp_path / "model.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    err = train_fails(capsys, config)
    assert str(config) in err and "not a YAML text file" in err


def test_a_run_output_dir_that_is_a_file_is_refused(capsys, recipe, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    err = train_fails(capsys, recipe, f"run.output_dir={tmp_path / 'taken'}")
    assert "run.output_dir" in err and "not a folder" in err
    err = train_fails(capsys, recipe, f"run.output_dir={tmp_path / 'taken' / 'run'}")
    assert "run.output_dir" in err and str(tmp_path / "taken") in err


@pytest.mark.parametrize("resume", ["bogus", "{tmp}/recipe.yaml", "{tmp}"])
def test_a_bogus_run_resume_is_refused_before_the_model_loads(capsys, recipe, tmp_path, resume, monkeypatch):
    import mmalign.t2i.task as t2i_task

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before run.resume was checked")

    monkeypatch.setattr(t2i_task, "load_t2i_components", no_model)
    resume = resume.format(tmp=tmp_path)
    err = train_fails(capsys, recipe, f"run.resume={resume}")
    assert f"run.resume {resume}" in err and "not a checkpoint folder" in err


def test_a_symlinked_shard_file_is_refused_and_not_followed(capsys, recipe, pairs, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT " * 100)
    (pairs / "shard-000001.tar").unlink()
    (pairs / "shard-000001.tar").symlink_to(secret)
    err = train_fails(capsys, recipe)
    assert "shard-000001.tar" in err and "symbolic link" in err
    assert "TOP-SECRET" not in err


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_sample_in_strict_mode_is_one_line(capsys, recipe, pairs, workers):
    # Garble every winner image in place (same size: the tar stays readable, the PNGs do not decode).
    for shard in sorted(pairs.glob("*.tar")):
        with tarfile.open(shard) as tf:
            spans = [(m.offset_data, m.size) for m in tf.getmembers() if m.name.endswith(".0.png")]
        with open(shard, "r+b") as fh:
            for offset, size in spans:
                fh.seek(offset)
                fh.write(b"\xff" * size)
    err = train_fails(capsys, recipe, "data.strict=true", "validation.prompts=[]", f"data.num_workers={workers}")
    assert "mmalign train:" in err and ".tar" in err and "sample" in err and "DataLoader worker" not in err
