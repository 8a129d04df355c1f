"""Scalars to TensorBoard and to `metrics.jsonl` in the workdir.

Only process 0 writes; other processes get a writer that does nothing, so
call sites need no `if`. The JSONL file is the machine-readable record (one
`{"step": s, name: value, ...}` object a line); TensorBoard is for looking.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
  """Appends scalars per step; after a resume, drops lines past the resume step.

  A run killed between a checkpoint and its next one logged steps that the
  resumed run repeats; `resume_step` trims them so each step appears once.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None,
               enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      _truncate_after(self.path, resume_step)
    self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=resume_step)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
    line = {"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                  for k, v in values.items()}}
    self._file.write(json.dumps(line) + "\n")
    self._file.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
