"""The one skeleton of the stages that train on a fixed data set (SFT, the PM, DPO).

A stage loads its model and data, plans its batches (`data.batching.plan`) and
says what trains (a `Trainee`); `fit` does the rest, the same way for all three:

  1. optimizer, state shardings and checkpointer (`setup.prepare`);
  2. the train state: the newest checkpoint's, else a fresh one from the
     trainee's params (dropped first when a checkpoint supersedes them);
  3. the jitted train step (state donated) and eval step, with their shardings;
     frozen weights (a LoRA base) are an argument of both, never a constant;
  4. the ordered loop over the plan (`training.loop`), evaluating on the
     held-out batches, then the export of the final model.

A resumed run is the uninterrupted run bit for bit: the data order is a function
of (seed, epoch) and the position is saved with the state.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from cai_jax import distributed
from cai_jax.data import batching
from cai_jax.model import lora as lora_lib
from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.training import loop as train_loop
from cai_jax.training import setup

Params = Any
Metrics = dict[str, float]


@dataclasses.dataclass
class Trainee:
  """What trains: the trained params' shapes and shardings, their initial values
  (handed over to the train state by `fit`: hold no other reference to them, so a
  resume frees them before restoring), and the frozen weights every step reads (a
  LoRA base, with `frozen_sh` its shardings; None when every weight trains)."""

  abstract: Params
  shardings: Params
  params: Params | None
  frozen: Params | None = None
  frozen_sh: Params | None = None
  lora: lora_lib.LoraSpec | None = None  # a causal LM's adapters on `frozen` (`lm`)

  @classmethod
  def lm(cls, cfg: ModelConfig, spec: lora_lib.LoraSpec | None, params: Params,
         sharder: Sharder, key: jax.Array) -> "Trainee":
    """A causal LM (SFT, DPO): every weight of `params`, or fresh LoRA adapters from
    `key` on the frozen `params` (`lora.trainable_params`)."""
    param_sh = transformer.param_shardings(cfg, sharder)
    abstract, train_sh, trained, frozen = lora_lib.trainable_params(cfg, spec, params,
                                                                    param_sh, sharder, key)
    return cls(abstract, train_sh, trained, frozen, param_sh if spec else None, spec)

  def merged(self, trained: Params) -> Params:
    """The causal LM's weights: `trained` itself, or the adapters merged into the base."""
    if self.lora is None:
      return trained
    return jax.jit(lambda b, a: lora_lib.merge(b, a, self.lora),
                   out_shardings=self.frozen_sh)(self.frozen, trained)


def fit(name: str, out: str, config: ml_collections.ConfigDict, trainee: Trainee,
        plan: batching.Plan, *, sharder: Sharder, key: jax.Array, data_info: dict[str, Any],
        train_step: Callable, eval_step: Callable, batch_sh: Any,
        train_batch: Callable[[Any, int], Any], held_batch: Callable[[Any, int], Any],
        evaluate: Callable[[Sequence[tuple[Any, Any]], int], Metrics] | None,
        summarize: Callable, units: Callable, rate_name: str,
        postfix: Callable[[Metrics], dict[str, str]],
        export: Callable[[Params, int], None] | None = None,
        should_stop: Callable[[int], bool] | None = None) -> setup.Result:
  """Trains (or resumes) `trainee` over `plan` under `config.optim` and `config.train`;
  checkpoints in `<out>/checkpoints`, metrics in `<out>/metrics.jsonl`.

  train_step(state, batch, frozen, *, tx, schedule) -> (state, metrics) and
  eval_step(params, batch, frozen) -> outputs are the stage's steps (their other
  arguments bound); `train_batch(rows, T)` / `held_batch(rows, T)` make a host
  batch of the train / held-out rows, placed with `batch_sh`. `evaluate(outs, step)`
  turns the eval step's outputs on the held-out batches, [(rows, outputs)], into
  metrics (None: no held-out set). `name`, `summarize`, `units`, `rate_name` and
  `postfix` are the loop's (`training.loop.ordered_loop`); `export(params, step)`
  writes the final model when the run finishes.
  """
  t = config.train
  # --- Optimizer, state, checkpoints ---
  s = setup.prepare(os.path.join(out, "checkpoints"), config.optim, plan.total_steps,
                    trainee.abstract, trainee.shardings, sharder, t.keep_checkpoints)
  params, trainee.params = trainee.params, None  # the train state takes them over
  if s.ckpt.latest_step() is not None:
    params = None  # superseded by the checkpoint: free it before restoring
  state, start = setup.start_state(s, trainee.abstract, params, key, data_info)
  del params

  # --- Jitted steps ---
  frozen = trainee.frozen
  step_jit = jax.jit(functools.partial(train_step, tx=s.tx, schedule=s.schedule),
                     in_shardings=(s.state_sh, batch_sh, trainee.frozen_sh),
                     out_shardings=(s.state_sh, sharder.replicated), donate_argnums=0)
  eval_jit = jax.jit(eval_step, in_shardings=(trainee.shardings, batch_sh, trainee.frozen_sh),
                     out_shardings=sharder.replicated)

  def held_out(params, step: int) -> Metrics:
    outs = [(rows, eval_jit(params, distributed.batch_to_global(held_batch(rows, T), batch_sh),
                            frozen))
            for T, rows in batching.eval_batches(plan.held_buckets, t.eval_batch_size)]
    return evaluate(outs, step)

  # --- The loop ---
  loop = train_loop.ordered_loop(
      name, lambda state, batch: step_jit(state, batch, frozen), plan.order, train_batch,
      batch_sh, total_steps=plan.total_steps, data_info=data_info, train=t,
      summarize=summarize, units=units, rate_name=rate_name,
      evaluate=held_out if evaluate is not None else None, postfix=postfix)
  return setup.train(loop, state, start, plan.total_steps, s, out, should_stop, export=export)
