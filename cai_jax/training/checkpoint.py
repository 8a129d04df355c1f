"""Orbax checkpoints of a TrainState plus the data position; clean SIGTERM exits.

One checkpoint step holds four items, so a later phase can restore just the
params (`restore_params`) without knowing the optimizer:

  params     StandardSave: the model parameters
  opt_state  StandardSave: the optimizer state (moments, counters)
  rng        StandardSave: {"key_data": raw uint32 data of the PRNG key}
  data       JsonSave: where the data stream stands (epoch, batch, ...) and
             anything else the phase needs to resume exactly

Restores go into `jax.eval_shape` targets that carry shardings
(`optim.abstract_train_state`), so a checkpoint written on one mesh restores
onto whatever mesh the current run has.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cai_jax.training.optim import Params, TrainState

ITEMS = ("params", "opt_state", "rng", "data")


class Checkpointer:
  """A `CheckpointManager` for TrainState + data position (a context manager)."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=ITEMS)

  def save(self, state: TrainState, data: dict[str, Any], *, force: bool = False
           ) -> bool:
    """Save at step `state.step` if the interval says so (or `force`).

    With async saving the arrays are copied to host before this returns, so
    the caller may donate `state` to the next step right away.
    """
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        rng=ocp.args.StandardSave({"key_data": jax.random.key_data(state.key)}),
        data=ocp.args.JsonSave(dict(data)))
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict[str, Any]]:
    """(state, data) of `step` (default: latest), placed as `abstract_state` says."""
    step = self._resolve(step)
    key_data = jax.eval_shape(jax.random.key_data, abstract_state.key)
    key_data = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype,
                                    sharding=abstract_state.key.sharding)
    out = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
        rng=ocp.args.StandardRestore({"key_data": key_data}),
        data=ocp.args.JsonRestore()))
    state = TrainState(
        step=jax.device_put(np.int32(step), abstract_state.step.sharding),
        params=out.params, opt_state=out.opt_state,
        key=jax.random.wrap_key_data(out.rng["key_data"]))
    return state, dict(out.data)

  def restore_data(self, step: int | None = None) -> dict[str, Any]:
    return dict(self._manager.restore(self._resolve(step), args=ocp.args.Composite(
        data=ocp.args.JsonRestore())).data)

  def _resolve(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self.all_steps():
      raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}"
                              f" (have {list(self.all_steps())})")
    return step

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self._manager.all_steps()

  def reached_preemption(self, step: int) -> bool:
    """True on every host once a multi-host preemption sync point is reached."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_or_init(ckpt: Checkpointer, abstract_state: TrainState,
                    init: Callable[[], TrainState], expect: dict[str, Any]) -> TrainState:
  """The latest checkpoint's state if there is one, else `init()`.

  `expect`: data facts (dataset fingerprint, batch size, seed) that the
  checkpoint's data item must match; resuming on other data is refused, since
  the data position would mean something else.
  """
  if ckpt.latest_step() is None:
    return init()
  state, data = ckpt.restore(abstract_state)
  saved = {k: data.get(k) for k in expect}
  if saved != dict(expect):
    raise ValueError(f"{ckpt.directory}: the checkpoint was made with other data or"
                     f" batching ({saved} vs now {dict(expect)}); use a fresh workdir")
  logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
  return state


def restore_params(directory: str, abstract_params: Params, step: int | None = None
                   ) -> Params:
  """Only the params of a Checkpointer directory (e.g. the SFT model for the PM)."""
  with ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoints")
    return manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params))).params


# --- Preemption -------------------------------------------------------------------------


class StopFlag:
  """Set by SIGTERM (preemption) or `request()`; the train loop polls `requested`.

  Used as a context manager: installs the handler on entry (main thread only,
  a Python restriction) and puts the previous handler back on exit, so
  nothing outlives the run.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self.signum: int | None = None
    self._event = threading.Event()

  def request(self, signum: int | None = None) -> None:
    self.signum = signum
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning("received signal %d: will save a checkpoint and stop", signum)
    self.request(signum)

  def __enter__(self) -> "StopFlag":
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    else:
      logging.warning("StopFlag: not on the main thread; signals are not caught")
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
