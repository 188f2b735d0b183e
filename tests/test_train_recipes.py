"""Published recipes, accelerate configs, the SDXL launch script, and bad input caught before any model loads."""

import subprocess
from pathlib import Path

import pytest
import yaml

from mmalign.cli import main
from mmalign.config import ConfigError, load_config
from mmalign.t2i.task import T2ITrainConfig
from mmalign.train.tasks import load_train_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
SCRIPT = ROOT / "scripts" / "train_sdxl_dpo.sh"


def test_the_published_recipes_are_all_there():
    assert {p.name for p in RECIPES} >= {"sd15_dpo.yaml", "sdxl_dpo.yaml", "sdxl_dpo_lora.yaml", "sdxl_mapo.yaml",
                                         "sdxl_rankdpo.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_documents_beta_and_lr(path):
    cfg = load_train_config(path)
    text = path.read_text()
    assert "averaged over C,H,W" in text and "scale_lr" in text  # what beta assumes, what lr means
    assert cfg.task == "t2i" and cfg.method.beta is not None
    if "sdxl" in path.name:
        assert cfg.data.resolution == 1024 and cfg.model.gradient_checkpointing
    # the documented switch to the cache gives a valid config too
    load_train_config(path, ["data.cache=true", "data.random_flip=false"])


def test_recipes_carry_the_papers_numbers():
    sd15, sdxl = (load_train_config(ROOT / "configs" / n) for n in ("sd15_dpo.yaml", "sdxl_dpo.yaml"))
    for cfg in (sd15, sdxl):  # Diffusion-DPO: beta 5000, 1e-8 per pair x 2048 pairs on 16 GPUs
        assert cfg.method.name == "dpo" and cfg.method.beta == 5000 and cfg.optim.scale_lr
        total = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * 16
        assert total == 2048 and cfg.optim.lr * total == pytest.approx(2.048e-5)
    assert sdxl.optim.name in ("adafactor", "adamw8bit") and sd15.data.resolution == 512
    lora = load_train_config(ROOT / "configs" / "sdxl_dpo_lora.yaml")
    assert lora.model.lora is not None and lora.method.beta == 5000
    mapo = load_train_config(ROOT / "configs" / "sdxl_mapo.yaml")
    assert mapo.method.name == "mapo" and mapo.method.beta == 0.1 and mapo.method.mapo_snr_value == 0.5
    rank = load_train_config(ROOT / "configs" / "sdxl_rankdpo.yaml")
    assert rank.method.name == "rankdpo" and rank.data.schema_name == "ranked"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerates_own_classes(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    # sub-configs are turned into launcher options: every key must be one the installed launcher knows
    known = {a.dest for a in launch_command_parser()._actions}
    for section in (cfg.fsdp_config, cfg.deepspeed_config):
        assert set(section or {}) <= known, set(section) - known


def test_accelerate_configs_cover_the_four_setups():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    kinds = {p.name: load_config_from_file(str(p)).distributed_type for p in ACCELERATE}
    assert kinds == {"single_gpu.yaml": DistributedType.NO, "multi_gpu.yaml": DistributedType.MULTI_GPU,
                     "fsdp.yaml": DistributedType.FSDP, "deepspeed_zero2.yaml": DistributedType.DEEPSPEED}
    ds = load_config_from_file(str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"))
    assert ds.deepspeed_config["zero_stage"] == 2


def run_script(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_script_help_explains_every_knob():
    proc = run_script("--help")
    assert proc.returncode == 0, proc.stderr
    parsed = SCRIPT.read_text() + (SCRIPT.parent / "_launch_common.sh").read_text()  # the options every launcher takes
    options = {line.split()[0] for line in parsed.splitlines()
               if line.strip().startswith("--") and ")" in line.split()[0]}
    options = {o.rstrip(")") for o in options}
    assert options >= {"--parquet", "--shards", "--cache", "--config", "--accelerate-config", "--dry-run"}
    for option in options:
        assert option in proc.stdout, option
    assert "set -euo pipefail" in SCRIPT.read_text()


def test_script_dry_run_prints_convert_cache_and_launch_with_a_valid_config(tmp_path, capsys):
    proc = run_script("--dry-run", "--parquet", "pickapic/a.parquet", "--parquet", "pickapic/b.parquet",
                      "--shards", str(tmp_path / "shards"), "--limit", "50", "--cache", "--num-processes", "4",
                      "--output-dir", str(tmp_path / "run"), "--", "train.max_steps=7")
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:].split() for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 3
    convert, cache, launch = commands
    assert convert[1:6] == ["-m", "mmalign.cli", "shards", "convert", "--from"] and "pickapic/b.parquet" in convert
    assert convert[convert.index("--out") + 1] == str(tmp_path / "shards") and "--limit" in convert
    assert "--cache-only" in cache and launch[:2] == ["accelerate", "launch"] and "--num_processes" in launch
    assert not (tmp_path / "shards").exists()  # a dry run runs nothing
    # the printed train command is a valid config for mmalign itself
    args = launch[launch.index("train") + 1:]
    assert "data.cache=true" in args and "train.max_steps=7" in args
    assert main(["train", *args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["cache"] is True and printed["train"]["max_steps"] == 7
    assert printed["run"]["output_dir"] == str(tmp_path / "run")


def test_script_uses_existing_shards_and_refuses_bad_arguments(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    proc = run_script("--dry-run", "--parquet", "x.parquet", "--shards", str(tmp_path / "shards"))
    assert proc.returncode == 0 and "not converting again" in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("+ ")][0].startswith("+ accelerate")
    for bad, message in [(["--bogus"], "unknown option '--bogus'"), (["--limit", "x"], "--limit must be"),
                         (["--config", "nope.yaml"], "no such recipe file"), (["--", "oops"], "key=value"),
                         (["--shards", str(tmp_path / "none")], "has no manifest.json")]:
        proc = run_script(*bad)
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)


# -- bad input: each a clear error before any model loads -------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    import mmalign.t2i.task as t2i

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(t2i, "load_t2i_components", refuse)


def tiny(tmp_path, recipe="t2i_dpo.yaml", *overrides):
    return load_config(T2ITrainConfig, ROOT / "configs" / "tiny" / recipe,
                       [f"run.output_dir={tmp_path / 'run'}", "train.progress=false", *overrides])


def write_pairs(path, labels):
    from mmalign.data.schemas import pair_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.toy.scenes import sample_scene

    img = sample_scene(0).render()
    with ShardSetWriter(path, "pair") as w:
        for i, label in enumerate(labels):
            w.write(pair_sample(f"k{i}", img, img, caption="a red circle", label_0=label))
    return path


def test_zero_usable_pairs_fail_before_the_model_loads(tmp_path, no_model_load, capsys):
    from mmalign.train.trainer import DataError, train

    ties = write_pairs(tmp_path / "ties", [0.5] * 6)
    with pytest.raises(DataError, match=r"lists 0 usable pairs \(ties dropped\).*method.ties drop"):
        train(tiny(tmp_path / "a", "t2i_dpo.yaml", f"data.shards={ties}"))
    empty = write_pairs(tmp_path / "empty", [])
    with pytest.raises(DataError, match="lists 0 usable pairs"):
        train(tiny(tmp_path / "b", "t2i_dpo.yaml", f"data.shards={empty}"))
    few = write_pairs(tmp_path / "few", [1.0, 0.0, 0.5])
    with pytest.raises(DataError, match="lists 2 usable pairs .*fewer than train.batch_size 4"):
        train(tiny(tmp_path / "c", "t2i_dpo.yaml", f"data.shards={few}"))
    assert main(["train", str(ROOT / "configs/tiny/t2i_dpo.yaml"), f"data.shards={ties}",
                 f"run.output_dir={tmp_path / 'd'}", "train.progress=false"]) == 2
    assert "no usable batch" in capsys.readouterr().err


def test_bad_model_resolution_and_shards_fail_before_the_model_loads(tmp_path, no_model_load):
    from mmalign.models.loading import ModelLoadError
    from mmalign.data.manifest import ManifestError
    from mmalign.train.trainer import TrainingError, train

    with pytest.raises(ModelLoadError, match="no such model folder"):
        train(tiny(tmp_path / "a", "t2i_dpo.yaml", f"model.pretrained={tmp_path}/missing/model"))
    with pytest.raises(TrainingError, match="not a multiple of 16, which SDXL"):
        train(tiny(tmp_path / "b", "t2i_dpo_sdxl.yaml", "data.resolution=40"))
    with pytest.raises(ManifestError, match="no manifest"):
        train(tiny(tmp_path / "c", "t2i_dpo.yaml", f"data.shards={tmp_path}"))
    with pytest.raises(ManifestError, match="holds 'pair' shards"):
        train(tiny(tmp_path / "d", "t2i_rankdpo.yaml", "data.shards=assets/tiny/pairs"))
    with pytest.raises(TrainingError, match="train.ema is for full fine-tunes"):
        train(tiny(tmp_path / "e", "t2i_dpo_lora.yaml", "train.ema=true"))


@pytest.mark.parametrize("override, expected", [
    ("method.name=dpoo", "key 'method.name'"),
    ("method.loss_type=sigmoidd", "loss_type 'sigmoidd' is not one of"),
    ("method.ties=keep", "has no tie-aware form"),
    ("data.resolution=36", "not a multiple of 8"),
    ("optim.name=sgd", "key 'optim.name'"),
])
def test_bad_method_and_options_are_config_errors(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(T2ITrainConfig, ROOT / "configs" / "tiny" / "t2i_dpo.yaml", [override])
