"""Metric logging: one JSON object per line (``metrics.jsonl``) and tensorboard event files."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

__all__ = ["MetricLogger", "read_jsonl"]


class MetricLogger:
    """Write namespaced scalar metrics (``train/loss``, ``eval/energy_distance``…) to
    ``<out_dir>/metrics.jsonl`` and, if ``tensorboard``, to ``<out_dir>/tb``.

    Only the main process should create one.  Non-finite values are written as ``null`` in the
    JSONL file (JSON has no NaN) and skipped in tensorboard.

    ``resume_step``: a run resumed from a checkpoint at that step first drops the records logged
    after it (by the interrupted run, past its last checkpoint) and any torn last line, so the
    file reads as one uninterrupted run.
    """

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True, filename: str = "metrics.jsonl",
                 resume_step: Optional[int] = None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, filename)
        if os.path.exists(self.path):
            self._trim(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: imports tensorboard

            self._tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def _trim(self, resume_step: Optional[int]) -> None:
        from .files import write_text

        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines(keepends=True)
        kept = []
        for line in lines:
            if not line.endswith("\n"):
                continue  # a torn last line
            try:
                step = json.loads(line).get("step")
            except json.JSONDecodeError:
                continue
            if resume_step is None or step is None or step <= resume_step:
                kept.append(line)
        if len(kept) != len(lines):
            write_text("".join(kept), self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        record: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else None
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike, key: Optional[str] = None) -> list[dict[str, Any]]:
    """Read a metrics file; with ``key``, only the records that contain it."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if key is None or key in r]
