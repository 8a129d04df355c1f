"""What every training stage sets up the same way: batch checks, optimizer and
state shardings, init-or-restore from Orbax, and the result it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from cai_jax.model.sharding import Sharder
from cai_jax.training import checkpoint, optim
from cai_jax.training import loop as train_loop


@dataclasses.dataclass(frozen=True)
class Result:
  """What a training stage returns. step: optimizer steps (SFT, PM) or iterations (PPO)."""

  status: str  # "done" | "preempted"
  step: int
  metrics: dict[str, float]
  output_dir: str
  state: optim.TrainState | None = dataclasses.field(default=None, repr=False)


def check_batch_split(train: ml_collections.ConfigDict, sharder: Sharder, unit: str,
                      sizes: dict[str, int] | None = None) -> None:
  """Each microbatch (and `sizes`, e.g. the eval batch) splits over the batch shards."""
  if train.batch_size % train.microbatches:
    raise ValueError(f"train.batch_size={train.batch_size} is not a multiple of"
                     f" train.microbatches={train.microbatches}")
  shards = sharder.batch_shards
  sizes = {"microbatch": train.batch_size // train.microbatches, **(sizes or {})}
  for name, size in sizes.items():
    if size % shards:
      raise ValueError(f"{name} of {size} {unit} does not split over the {shards}"
                       f" batch shards of mesh {dict(sharder.mesh.shape)}")


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_sh: Any  # TrainState of shardings
  ckpt: checkpoint.Checkpointer


def prepare(directory: str, optim_config: ml_collections.ConfigDict, total_steps: int,
            abstract_params, param_sh, sharder: Sharder, keep: int | None) -> TrainSetup:
  """Optimizer, its state's shardings and the checkpointer of `directory`."""
  tx, schedule = optim.make_optimizer(optim_config, total_steps, abstract_params)
  state_sh = optim.train_state_shardings(tx, abstract_params, param_sh, sharder)
  return TrainSetup(tx, schedule, state_sh, checkpoint.Checkpointer(directory,
                                                                    max_to_keep=keep))


def init_or_restore(s: TrainSetup, abstract_params, init: Callable[[], optim.TrainState],
                    expect: dict[str, Any]) -> optim.TrainState:
  """The latest checkpoint's state (checked against `expect`), else `init()`."""
  abstract = optim.abstract_train_state(s.tx, abstract_params, s.state_sh)
  return checkpoint.restore_or_init(s.ckpt, abstract, init, expect)


def start_state(s: TrainSetup, abstract_params, params, key: jax.Array,
                expect: dict[str, Any]) -> tuple[optim.TrainState, int]:
  """(state, its step): the latest checkpoint's, else a fresh one from `params`
  (donated) and `key`.

  A caller that resumes should pass params=None (and drop its own reference)
  so the loaded weights are freed before the checkpoint is restored.
  """
  init = jax.jit(lambda p, k: optim.init_train_state(p, s.tx, k), out_shardings=s.state_sh,
                 donate_argnums=0)
  state = init_or_restore(s, abstract_params, lambda: init(params, key), expect)
  return state, int(jax.device_get(state.step))


def train(loop: "train_loop.Loop", state: optim.TrainState, start: int, total_steps: int,
          s: TrainSetup, out: str, should_stop: Callable[[int], bool] | None = None,
          export: Callable[[Any, int], None] | None = None) -> Result:
  """Runs `loop` from step `start` to `total_steps` (`training.loop.run`); when it
  finishes (not when preempted), `export(params, steps)` writes the final model."""
  status, state, last, done = train_loop.run(loop, state, start, total_steps, s.ckpt, out,
                                             should_stop)
  if status == "done" and export is not None:
    export(state.params, done)
  return Result(status, done, last, out, state)
