"""Atomic checkpoints: written under a temporary name and renamed, so a crash or a full disk mid-save leaves the
previous checkpoint intact and never a half checkpoint that looks whole.

A checkpoint is listed only when complete: its last file, `checkpoint_complete.json`, records the size of every
other file, and a folder whose files are missing or of another size is skipped (with the reason). Re-saving a step
moves the good copy aside (`.old-step-N`) only once the new one is complete, and a folder is removed (pruning, a
replaced copy) by first renaming it out of the listing (`.trash-*`), so a kill at any point leaves no listed half
checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

_STEP = re.compile(r"^(\.old-)?step-(\d+)$")
STATE_FILE = "trainer_state.json"
MARKER = "checkpoint_complete.json"


class RefusedCheckpoint(pickle.UnpicklingError):
    """A checkpoint file that would only load by unpickling arbitrary objects: refused, never a reason to fall back
    to another checkpoint."""


def check_checkpoint(path: str | Path) -> str | None:
    """None when the folder is a complete checkpoint, else why it is not. Checkpoints written before the marker
    existed (a `trainer_state.json`, no marker) count as complete; loading them checks the rest."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return None if (path / STATE_FILE).is_file() else f"incomplete (no {MARKER}, no {STATE_FILE})"
    try:
        files = json.loads(marker.read_text())["files"]
        assert isinstance(files, dict)
    except Exception as err:  # noqa: BLE001 - any damage to the marker means: not known to be complete
        return f"{MARKER} is unreadable ({type(err).__name__})"
    for rel, size in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    return None


def scan_checkpoints(run_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(incomplete checkpoint, why)]). A `.old-step-N` (the previous copy of a
    step whose re-save was interrupted between its two renames) stands in for a missing `step-N`."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return [], []
    by_step: dict[int, Path] = {}
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (not m.group(1) or int(m.group(2)) not in by_step):
            by_step[int(m.group(2))] = p
    complete, skipped = [], []
    for _, p in sorted(by_step.items()):
        why = check_checkpoint(p)
        if why is None:
            complete.append(p)
        else:
            skipped.append((p, why))
    return complete, skipped


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`check_checkpoint`), oldest first."""
    return scan_checkpoints(run_dir)[0]


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    candidates, _ = resume_candidates(run_dir, resume)
    return candidates[0] if candidates else None


def resume_candidates(run_dir: str | Path, resume: str | None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(checkpoints to try, newest first; [(incomplete checkpoint skipped, why)]). `latest`: every complete one,
    so the loop can fall back when the newest cannot be loaded; a path: that checkpoint only, if complete."""
    if resume is None:
        return [], []
    if resume == "latest":
        complete, skipped = scan_checkpoints(run_dir)
        # incomplete folders older than the newest complete one change nothing: not worth a line
        return complete[::-1], [(p, why) for p, why in skipped if not complete or _step_of(p) > _step_of(complete[-1])]
    path = Path(resume)
    if not (path / STATE_FILE).is_file() and not (path / MARKER).is_file():
        raise FileNotFoundError(f"run.resume {resume}: not a checkpoint folder (no {STATE_FILE}); use 'latest' "
                                f"or a path like {Path(run_dir) / 'checkpoints' / 'step-100'}")
    why = check_checkpoint(path)
    return ([path], []) if why is None else ([], [(path, why)])


def _step_of(path: Path) -> int:
    return int(_STEP.match(path.name).group(2))


def write_completion_marker(folder: str | Path) -> None:
    """Record the size of every file in `folder` in its marker, written last and synced: the checkpoint is
    complete. The files are synced to disk first, so a power loss cannot leave a marker naming unwritten data."""
    folder = Path(folder)
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MARKER:
            _fsync(f)
            files[f.relative_to(folder).as_posix()] = f.stat().st_size
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    _fsync(tmp)
    os.replace(tmp, folder / MARKER)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # filesystems without fsync on read-only descriptors or directories
    finally:
        os.close(fd)


def remove_dir(path: str | Path) -> None:
    """Remove a folder so that it is never seen half-removed: renamed out of the listing first (one atomic step),
    then deleted. A kill mid-delete leaves only a `.trash-*` folder, removed by the next `commit_checkpoint`."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, write: Callable[[Path], None], state: dict,
                    total_limit: int | None = None) -> Path:
    """`write(tmp_dir)` fills a temporary folder; then the trainer state is written and the folder renamed.

    Older checkpoints beyond `total_limit` are pruned only after the new one is complete. One process; the
    trainer's multi-process save is `temporary_dir` + every process writing + `commit_checkpoint`.
    """
    tmp = temporary_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(run_dir, step, tmp, state, total_limit)


def temporary_dir(run_dir: str | Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is complete (never listed by `list_checkpoints`)."""
    return Path(run_dir) / "checkpoints" / f".tmp-step-{step}"


def commit_checkpoint(run_dir: str | Path, step: int, tmp: Path, state: dict, total_limit: int | None = None,
                      stateful: list = ()) -> Path:
    """Complete a filled temporary folder: write the `stateful` objects' states (`save_stateful`) and the trainer
    state, rename it to `step-N`, prune old ones. On any failure the temporary folder is removed."""

    def finish(t: Path) -> None:
        save_stateful(t, stateful)
        (t / STATE_FILE).write_text(json.dumps(state, indent=1))
        write_completion_marker(t)  # last

    final = _replace_dir(tmp, Path(run_dir) / "checkpoints" / f"step-{step}", finish)
    _tidy(Path(run_dir) / "checkpoints", keep=final)
    if total_limit is not None:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            remove_dir(old)
    return final


def set_aside_newer(run_dir: str | Path, step: int) -> list[Path]:
    """A run resumed from `step-<step>` while newer checkpoints exist (an explicit older `run.resume`, or a fallback
    past damaged ones) continues a different history: the newer ones are renamed out of the listing to
    `.superseded-step-N` (kept for the user, never pruned), so `latest` and pruning see only this run's. Returns
    their new paths. Main process."""
    root = Path(run_dir) / "checkpoints"
    moved = []
    for path in root.iterdir() if root.is_dir() else []:
        m = _STEP.match(path.name)
        if m and not m.group(1) and int(m.group(2)) > step:
            target = root / f".superseded-{path.name}"
            n = 1
            while target.exists():
                target, n = root / f".superseded-{path.name}-{n}", n + 1
            path.rename(target)
            moved.append(target)
    return moved


def _tidy(root: Path, keep: Path) -> None:
    """What kills left behind (main process, after a save): `.trash-*` and other steps' `.tmp-step-*` folders are
    removed; a `.old-step-N` is renamed back to `step-N` when that is missing (a re-save killed between its two
    renames), else removed."""
    for p in root.iterdir():
        if p == keep or not p.is_dir():
            continue
        if p.name.startswith(".trash-") or p.name.startswith(".tmp-step-"):
            shutil.rmtree(p, ignore_errors=True)
        elif (m := _STEP.match(p.name)) and m.group(1):
            twin = root / f"step-{m.group(2)}"
            if twin.exists():
                remove_dir(p)
            else:
                p.rename(twin)


def save_stateful(folder: str | Path, objects: list) -> None:
    """`obj.state_dict()` of each object (lr scheduler, EMA, ...) to `stateful_{i}.pt`. Main process."""
    import torch

    for i, obj in enumerate(objects):
        torch.save(obj.state_dict(), Path(folder) / f"stateful_{i}.pt")


def load_stateful(folder: str | Path, objects: list) -> None:
    """Restore what `save_stateful` wrote, with `torch.load(weights_only=True)`: tensors and plain containers only.
    (Objects registered with accelerate instead are unpickled by its `load_state` with `weights_only=False`, which
    would run code from a checkpoint someone else wrote.)"""
    import torch

    folder = Path(folder)
    if any(folder.glob("custom_checkpoint_*")):
        raise RefusedCheckpoint(f"{folder}: written by an earlier mmalign, whose scheduler state "
                                     "(custom_checkpoint_*.pkl) only loads by unpickling arbitrary objects; refused")
    for i, obj in enumerate(objects):
        path = folder / f"stateful_{i}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the checkpoint (the state of {type(obj).__name__}); the "
                                    "checkpoint is incomplete or was written by a run with other stateful objects")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # weights_only refuses both a file that names other objects (a planted pickle: never a reason to fall
            # back to an older checkpoint) and plain damage (flipped bytes): tell them apart by the globals it names.
            if _unsafe_globals(path):
                raise RefusedCheckpoint(f"{path}: refused, it holds more than tensors and plain containers "
                                        f"(loaded with torch.load(weights_only=True)): {err}") from None
            raise ValueError(f"{path}: damaged, it does not load ({err})") from None
        obj.load_state_dict(state)


def _unsafe_globals(path: Path) -> list[str]:
    """The non-allowlisted globals a torch checkpoint names (without unpickling it); [] for a damaged file."""
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # unreadable: damage, not a payload
        return []


def load_training_checkpoint(accelerator, checkpoint: str | Path, stateful: list) -> tuple[dict, str | None]:
    """Restore `checkpoint` into the prepared objects: the loop's stateful objects (`load_stateful`, first: it
    refuses what accelerate would unpickle), then `accelerator.load_state`. Returns (the trainer state, why this
    process's RNG state could not be restored or None): accelerate skips an unreadable RNG file silently."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint / STATE_FILE} holds no trainer state")
    load_stateful(checkpoint, stateful)
    rng_problem = rng_state_problem(checkpoint, accelerator.process_index)
    accelerator.load_state(str(checkpoint))
    return state, rng_problem


def rng_state_problem(checkpoint: str | Path, process_index: int) -> str | None:
    """Why `accelerator.load_state` would not restore this process's RNG state (it logs that at info level only),
    or None. Read as accelerate reads it: `accelerate.utils.load`, i.e. `torch.load(weights_only=True)` with its
    few numpy allowances, so checking unpickles nothing that loading would not."""
    from accelerate.utils import RNG_STATE_NAME, load

    path = Path(checkpoint) / f"{RNG_STATE_NAME}_{process_index}.pkl"
    if not path.is_file():
        return f"{path} is missing"
    try:
        states = load(path)
    except Exception as err:  # noqa: BLE001 - any failure is what accelerate would swallow
        return f"{path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
    need = {"random_state", "numpy_random_seed", "torch_manual_seed"}
    if not isinstance(states, dict) or not need <= set(states):
        return f"{path} lacks the RNG states ({', '.join(sorted(need))})"
    return None


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def atomic_dir(final: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp_dir)` fills a temporary sibling folder, which then replaces `final` (final model outputs)."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    return _replace_dir(tmp, final, write)


def _replace_dir(tmp: Path, final: Path, finish: Callable[[Path], object]) -> Path:
    """`finish(tmp)`, then `tmp` replaces `final`; on any failure `tmp` is removed and `final` is left as it was.

    The previous `final` is renamed aside (`.old-NAME`) only once `tmp` is complete, and deleted only after `tmp`
    took its place: a kill at any point leaves a whole copy under `final` or, between the two renames, `.old-NAME`
    (which `scan_checkpoints` lists in place of a missing step)."""
    old = final.with_name(f".old-{final.name}")
    try:
        finish(tmp)
        if final.exists():
            if old.exists():  # a leftover of an earlier replacement: `final` is the good copy
                remove_dir(old)
            final.rename(old)
        tmp.rename(final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    if old.exists():
        remove_dir(old)
    return final
