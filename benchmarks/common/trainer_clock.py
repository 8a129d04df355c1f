"""The clock of a transformers `Trainer` (TRL's trainers are ones): the wall time at the
end of every optimizer step and every loss it logs, taken from inside its loop."""

from __future__ import annotations

import time


def clock():
  """(callback, stamps, losses): pass `callback` to the trainer; `stamps` then gets
  `time.perf_counter()` at the end of every step, `losses` every logged loss."""
  import transformers
  stamps: list[float] = []
  losses: list[float] = []

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
      stamps.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kw):
      if logs and "loss" in logs:
        losses.append(float(logs["loss"]))

  return Clock(), stamps, losses
