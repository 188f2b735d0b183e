"""Run metrics: one JSON line per logged step (`metrics.jsonl`) and the same scalars in TensorBoard (`tb/`).

Metric names are stable across modalities (`loss`, `rewards/accuracies`, `rewards/margins`, ...), so a DPO run
on images and one on a VLM read the same on a dashboard.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, start_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # On resume, drop rows logged after the checkpoint we restart from (they will be logged again), and a
            # line a power loss or a full disk left partial; the file is replaced atomically.
            kept = [json.dumps(row) for row in _read_rows(self.path) if row.get("step", 0) <= start_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._fh = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()})
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl`; a line that is not whole JSON (a write cut by a power loss or a full
    disk) is dropped with a warning."""
    return _read_rows(Path(run_dir) / "metrics.jsonl")


def _read_rows(path: Path) -> list[dict]:
    rows, bad = [], []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    if bad:
        what = "a partial last line" if bad == [len(lines)] else f"lines {bad} (not whole JSON rows; partial writes)"
        warnings.warn(f"{path}: dropped {what}", stacklevel=3)
    return rows
