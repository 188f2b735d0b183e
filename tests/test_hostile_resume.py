"""Runs that must still resume after a kill, a power loss or a damaged file (issue 15, "Runs that cannot resume").

A kill is emulated in-process: the patched filesystem call removes what a killed process would have removed so
far and raises `Killed` (a BaseException, as KeyboardInterrupt); from then on every removal does nothing, as a
dead process removes nothing (the cleanup handlers that run during unwinding cannot tidy up).
Uses the tiny regression task of tests/test_train_generic.py.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from mmalign.train import checkpoint as ckpt
from mmalign.train.metrics import MetricsLogger, read_metrics
from mmalign.train.trainer import TrainingError, train
from tests.test_train_generic import cfg_for, registered  # noqa: F401  (fixture)

COMMON = ["train.checkpoint_every=2", "train.gradient_accumulation_steps=2"]


class Killed(BaseException):
    pass


def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


def steps(tmp_path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run_dir(tmp_path))]


def kill_in_rmtree(monkeypatch, victim) -> dict:
    """The first `shutil.rmtree` (in checkpoint.py or trainer.py) of a folder for which `victim(path)` holds
    deletes that folder's `model.safetensors` and kills the process."""
    real, seen = shutil.rmtree, {"killed": None}

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if seen["killed"]:
            return None
        if path.is_dir() and victim(path):
            (path / "model.safetensors").unlink(missing_ok=True)
            seen["killed"] = path
            raise Killed(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    return seen


def assert_same_weights(a, b):
    for x, y in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(x, y)


def test_a_kill_while_the_latest_checkpoint_is_re_saved_keeps_a_usable_one(registered, tmp_path):
    """Resuming a run that already reached max_steps re-saves its latest checkpoint; a kill in the middle must not
    leave a listed, half-deleted step-4 (it crashed with FileNotFoundError ... pytorch_model.bin)."""
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4"))
    with pytest.MonkeyPatch.context() as mp:
        seen = kill_in_rmtree(mp, lambda p: "step-4" in p.name and not p.name.startswith(".tmp"))
        with pytest.raises(Killed):
            train(cfg_for(tmp_path, *COMMON, "train.max_steps=4", "run.resume=latest"))
    for path in ckpt.list_checkpoints(run_dir(tmp_path)):  # every listed checkpoint is whole
        assert (path / "model.safetensors").is_file(), (path, seen)
    assert [ckpt.read_state(p)["global_step"] for p in ckpt.list_checkpoints(run_dir(tmp_path))] == [2, 4]
    resumed = train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "run.resume=latest"))
    straight = train(cfg_for(tmp_path / "straight", *COMMON, "train.max_steps=6"))
    assert_same_weights(resumed, straight)
    assert steps(tmp_path) == ["step-2", "step-4", "step-6"]


def test_a_kill_between_the_renames_of_a_re_save_keeps_the_step(registered, tmp_path):
    """Killed after the good copy was moved aside and before the new one took its place: step 4 is still listed
    (the copy set aside) and resumes."""
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4"))
    real_rename, real_rmtree, killed = Path.rename, shutil.rmtree, []

    def rename(self, target):
        if self.name == ".tmp-step-4":
            killed.append(self)
            raise Killed(str(self))
        return real_rename(self, target)

    def rmtree(path, *args, **kwargs):
        return None if killed else real_rmtree(path, *args, **kwargs)  # a killed process cleans nothing up

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "rename", rename)
        mp.setattr(ckpt.shutil, "rmtree", rmtree)
        with pytest.raises(Killed):
            train(cfg_for(tmp_path, *COMMON, "train.max_steps=4", "run.resume=latest"))
    assert [ckpt.read_state(p)["global_step"] for p in ckpt.list_checkpoints(run_dir(tmp_path))] == [2, 4]
    resumed = train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "run.resume=latest"))
    straight = train(cfg_for(tmp_path / "straight", *COMMON, "train.max_steps=6"))
    assert_same_weights(resumed, straight)
    assert sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]


def test_a_kill_during_pruning_never_leaves_a_listed_partial_checkpoint(registered, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        seen = kill_in_rmtree(mp, lambda p: "step-2" in p.name and not p.name.startswith(".tmp"))
        with pytest.raises(Killed):
            train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "train.checkpoints_total_limit=1"))
    assert seen["killed"] is not None
    assert steps(tmp_path) == ["step-4"]  # the half-pruned step-2 is not listed
    resumed = train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "run.resume=latest",
                            "train.checkpoints_total_limit=1"))
    assert resumed.global_step == 6 and steps(tmp_path) == ["step-6"]
    # the leftover of the interrupted pruning is gone once a later checkpoint is complete
    assert sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").iterdir()) == ["step-6"]


def test_resume_latest_skips_an_incomplete_checkpoint_and_says_so_in_one_line(registered, tmp_path, capsys):
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4"))
    (run_dir(tmp_path) / "checkpoints" / "step-4" / "model.safetensors").unlink()  # what a kill mid-delete left
    capsys.readouterr()
    resumed = train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "run.resume=latest"))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(lines) == 1 and "model.safetensors" in lines[0], out
    assert "resumed from" in out and "step-2" in out
    straight = train(cfg_for(tmp_path / "straight", *COMMON, "train.max_steps=6"))
    assert_same_weights(resumed, straight)


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "trainer_state.json", "stateful_0.pt",
                                     "stateful_0.pt:flipped"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(registered, tmp_path, capsys, damaged):
    """An unreadable file of the same size (bit rot, a bad copy) is found when loading: warned, and the previous
    complete checkpoint is used; the result equals an uninterrupted run's. A damaged stateful file (the lr
    scheduler's, in every checkpoint) is damage, not a refused payload."""
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4"))
    name, _, how = damaged.partition(":")
    path = run_dir(tmp_path) / "checkpoints" / "step-4" / name
    if how == "flipped":  # 16 bytes flipped inside the zip's pickle: the archive still opens
        blob = bytearray(path.read_bytes())
        start = blob.find(b"data.pkl") + 64
        blob[start:start + 16] = bytes(b ^ 0xFF for b in blob[start:start + 16])
        path.write_bytes(bytes(blob))
    else:
        path.write_bytes(b"\xff" * path.stat().st_size)
    capsys.readouterr()
    resumed = train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "run.resume=latest"))
    out = capsys.readouterr().out
    assert "warning" in out and "step-4" in out and "resumed from" in out and "step-2" in out, out
    straight = train(cfg_for(tmp_path / "straight", *COMMON, "train.max_steps=6"))
    assert_same_weights(resumed, straight)


def test_resuming_an_older_checkpoint_sets_newer_ones_aside_and_never_prunes_the_new_one(registered, tmp_path,
                                                                                        capsys):
    """Resumed from step-2 while step-4 and step-6 exist (an explicit older run.resume, or a fallback): the newer
    ones are another history; they are kept as .superseded-* and leave the listing, so pruning (limit 1) keeps the
    checkpoint this run just saved and `latest` is this run's."""
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=6"))
    ckpts = run_dir(tmp_path) / "checkpoints"
    capsys.readouterr()
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4", f"run.resume={ckpts / 'step-2'}",
                  "train.checkpoints_total_limit=1"))
    out = capsys.readouterr().out
    assert "step-6 is newer than the checkpoint this run resumed from" in out, out
    assert [p.name for p in ckpt.list_checkpoints(run_dir(tmp_path))] == ["step-4"]
    assert (ckpts / ".superseded-step-4").is_dir() and (ckpts / ".superseded-step-6").is_dir()
    assert ckpt.read_state(ckpts / "step-4")["global_step"] == 4


def test_no_usable_checkpoint_is_one_clear_error(registered, tmp_path):
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4"))
    for step in ("step-2", "step-4"):
        path = run_dir(tmp_path) / "checkpoints" / step / "model.safetensors"
        path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(TrainingError, match="no usable checkpoint") as err:
        train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "run.resume=latest"))
    assert "step-2" in str(err.value) and "step-4" in str(err.value)


def test_an_incomplete_checkpoint_named_by_path_is_one_clear_error(registered, tmp_path):
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4"))
    step4 = run_dir(tmp_path) / "checkpoints" / "step-4"
    (step4 / "model.safetensors").unlink()
    with pytest.raises(TrainingError, match="no usable checkpoint.*step-4.*model.safetensors"):
        train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", f"run.resume={step4}"))


def test_a_partial_last_metrics_line_is_dropped_with_a_warning(registered, tmp_path):
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4"))
    metrics = run_dir(tmp_path) / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write('{"step": 5, "loss": 0.12')  # power loss mid-write
    with pytest.warns(UserWarning, match="metrics.jsonl.*partial"):
        rows = read_metrics(run_dir(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    with pytest.warns(UserWarning, match="metrics.jsonl.*partial"):
        train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "run.resume=latest"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_metrics(run_dir(tmp_path))] == [1, 2, 3, 4, 5, 6]


def test_the_metrics_logger_drops_a_partial_line_when_appending(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="partial"):
        logger = MetricsLogger(tmp_path, start_step=1, tensorboard=False)
    logger.log(2, {"loss": 0.5})
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


@pytest.mark.parametrize("how", ["missing", "unreadable"])
def test_a_missing_or_unreadable_rng_state_is_reported(registered, tmp_path, capsys, how):
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4"))
    rng = run_dir(tmp_path) / "checkpoints" / "step-4" / "random_states_0.pkl"
    assert rng.is_file()
    if how == "missing":  # in a checkpoint of an earlier mmalign (no completion marker to say it is missing)
        rng.unlink()
        (rng.parent / "checkpoint_complete.json").unlink(missing_ok=True)
    else:
        rng.write_bytes(b"\0" * rng.stat().st_size)
    capsys.readouterr()
    resumed = train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "run.resume=latest"))
    out = capsys.readouterr().out
    assert resumed.global_step == 6
    lines = [line for line in out.splitlines() if "random_states_0.pkl" in line]
    assert len(lines) == 1 and "not bit-exact" in lines[0] and "resumed from" in out and "step-4" in out, out


def test_a_sound_resume_prints_no_warning(registered, tmp_path, capsys):
    train(cfg_for(tmp_path, *COMMON, "train.max_steps=4"))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(cfg_for(tmp_path, *COMMON, "train.max_steps=6", "run.resume=latest"))
    assert "warning" not in capsys.readouterr().out
