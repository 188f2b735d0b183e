"""Run metrics: one JSON line per logged step (`metrics.jsonl`) and the same scalars in TensorBoard (`tb/`).

Metric names are stable across modalities (`loss`, `rewards/accuracies`, `rewards/margins`, ...), so a DPO run
on images and one on a VLM read the same on a dashboard.
"""

from __future__ import annotations

import json
import math
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
            # On resume, drop rows logged after the checkpoint we restart from (they will be logged again).
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
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
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
