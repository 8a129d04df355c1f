"""The one train loop: SFT (stage 3), the preference model (stage 6), DPO and the
on-policy RL of stage 7 (PPO, RLOO, GRPO).

A step is an optimizer update for SFT, the PM and DPO (`ordered_loop`), and a
whole iteration (rollout, reward, updates) for on-policy RL, whose adaptive KL
coefficient rides in the saved data position (`Loop.position`).

Steps run asynchronously; their metrics are fetched in batches (`sync`) at
log, eval and save points, so the host never waits on the device between
steps. A non-finite step stops the run without saving (the last checkpoint
stays). SIGTERM / `should_stop` / the checkpoint manager's preemption notice
save and stop; rerunning the same command resumes at the saved step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from cai_jax import distributed
from cai_jax.training import checkpoint
from cai_jax.training.metrics import MetricsWriter

Metrics = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Loop:
  """What differs between the loops: the step, the data and the metrics."""

  name: str  # progress-bar label
  step_fn: Callable[[Any, Any], tuple[Any, Metrics]]  # (state, batch) -> (state, metrics)
  # metrics need "finite" (bool); "loss", when present, is named in the error
  batch_at: Callable[[int], Any]  # step -> global batch
  position: Callable[[int], dict[str, Any]]  # step -> data position saved with a checkpoint
  summarize: Callable[[Sequence[Metrics]], dict[str, float]]  # fetched steps -> logged values
  units: Callable[[Sequence[Metrics]], float]  # fetched steps -> work done (tokens, pairs)
  rate_name: str | None  # e.g. "tokens_per_s"; None: no rate is logged
  evaluate: Callable[[Any, int], dict[str, float]] | None  # (params, step) -> held-out metrics
  postfix: Callable[[dict[str, float]], dict[str, str]]  # logged values -> progress-bar text
  save_every: int
  eval_every: int
  log_every: int
  unit: str = "step"  # progress-bar unit


def run(loop: Loop, state, start: int, total_steps: int, ckpt: checkpoint.Checkpointer,
        out: str, should_stop: Callable[[int], bool] | None = None
        ) -> tuple[str, Any, dict[str, float], int]:
  """Steps `start` .. `total_steps`.

  Returns (status "done" | "preempted", state, last logged values, steps done).
  """
  status, last = "done", {}
  pending: list[Metrics] = []
  window = {"t": time.perf_counter(), "units": 0.0}
  with checkpoint.StopFlag() as stop, \
       MetricsWriter(out, resume_step=start) as writer, \
       tqdm(total=total_steps, initial=start, desc=loop.name, unit=loop.unit,
            disable=jax.process_index() != 0) as bar:

    def sync(step: int, log: bool, timed: bool = True) -> None:
      """Fetch pending step metrics; raise on a non-finite one; log if asked."""
      nonlocal last
      fetched = jax.device_get(pending)
      pending.clear()
      for i, m in enumerate(fetched):
        if not m["finite"]:
          ckpt.wait_until_finished()
          raise FloatingPointError(
              f"{out}: non-finite loss or parameters at step {step - len(fetched) + i + 1}"
              f" (loss {m.get('loss')}); stopped without saving, the newest checkpoint"
              f" ({ckpt.latest_step()}) is kept. Lower the learning rate (optim.lr) or"
              " check the data, then rerun to resume from it")
      if not fetched:
        return
      now = time.perf_counter()
      window["units"] += loop.units(fetched)
      last = loop.summarize(fetched)
      if log:
        if timed and loop.rate_name:
          last[loop.rate_name] = window["units"] / max(now - window["t"], 1e-9)
        window.update(t=now, units=0.0)
        writer.write(step, last)
        bar.set_postfix(**loop.postfix(last))

    done = start
    try:
      if start == 0 and loop.evaluate is not None:
        writer.write(0, loop.evaluate(state.params, 0))
      for step in range(start, total_steps):
        state, metrics = loop.step_fn(state, loop.batch_at(step))
        pending.append(metrics)
        ckpt.seal_if_finished()
        done = step + 1
        bar.update(1)
        if step == start:  # the first step compiles: keep it out of the rate
          sync(done, log=True, timed=False)
        preempt = should_stop is not None and should_stop(done)
        preempt = preempt or stop.requested or ckpt.reached_preemption(done)
        save = done % loop.save_every == 0 or done == total_steps or preempt
        run_eval = loop.evaluate is not None and (done % loop.eval_every == 0
                                                  or done == total_steps)
        if done % loop.log_every == 0 or save or run_eval:
          sync(done, log=True)
        if run_eval:
          held = loop.evaluate(state.params, done)
          last.update(held)
          writer.write(done, held)
        if save:
          ckpt.save(state, loop.position(done), force=True)
        if run_eval or save:  # keep eval and checkpoint time out of the rate
          window.update(t=time.perf_counter(), units=0.0)
        if preempt:  # also at the last step: the caller stops instead of going on
          status = "preempted"
          logging.warning("stopping at step %d (preemption); resume with the same"
                          " command", done)
          break
    finally:
      ckpt.wait_until_finished()
      ckpt.close()
    if stop.requested and status == "done":  # SIGTERM during the last save: stop anyway
      status = "preempted"
      logging.warning("received a stop request at the end (step %d, saved); the caller"
                      " stops", done)
  return status, state, last, done


def mean_of(keys: Sequence[str], last: Sequence[str] = (), total: Sequence[str] = ()
            ) -> Callable[[Sequence[Metrics]], dict[str, float]]:
  """A `summarize` that averages `keys` over the fetched steps, takes `last`
  from the newest one (the learning rate) and sums `total` (tokens)."""
  return lambda fetched: {**{k: float(np.mean([m[k] for m in fetched])) for k in keys},
                          **{k: float(fetched[-1][k]) for k in last},
                          **{k: float(sum(m[k] for m in fetched)) for k in total}}


def ordered_loop(name: str, step_fn: Callable[[Any, Any], tuple[Any, Metrics]],
                 order, make_batch: Callable[[np.ndarray, int], Any], sharding, *,
                 total_steps: int, data_info: dict[str, Any], train,
                 summarize: Callable[[Sequence[Metrics]], dict[str, float]],
                 units: Callable[[Sequence[Metrics]], float], rate_name: str,
                 evaluate: Callable[[Any, int], dict[str, float]] | None,
                 postfix: Callable[[dict[str, float]], dict[str, str]]) -> Loop:
  """The Loop of a stage that walks a `data.batching.EpochOrder` (SFT, the PM,
  DPO): step s trains on `make_batch(rows, T)` at the order's position s, placed
  with `sharding`; the saved position is the order's plus `data_info` and the
  total; save, eval and log cadences come from the config's `train` block."""
  def batch_at(step: int):
    T, rows = order.batch(step)
    return distributed.batch_to_global(make_batch(rows, T), sharding)

  return Loop(name=name, step_fn=step_fn, batch_at=batch_at, summarize=summarize,
              position=lambda step: {**order.position(step), "total_steps": total_steps,
                                     **data_info},
              units=units, rate_name=rate_name, evaluate=evaluate, postfix=postfix,
              save_every=train.save_every, eval_every=train.eval_every,
              log_every=train.log_every)
