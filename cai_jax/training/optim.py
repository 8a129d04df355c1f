"""The optimizer, the train state, and the one train-step body.

Every phase that trains (SFT, preference model, DPO, PPO) builds its optimizer from
a config section with `make_optimizer` and takes its steps with `gradient_step`:
microbatch gradients accumulated by `accumulate_gradients` (a `lax.scan` inside
the jitted step), averaged, one optimizer update, the step's metrics. One call
of the step is one optimizer update, so the step counter, the learning-rate
schedule and the checkpoint step all count the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cai_jax.model.sharding import Sharder, constrain

Params = Any
Batch = Mapping[str, jax.Array]
# loss_fn(params, microbatch) -> (loss_sum, stats); `stats` are float32 scalar
# sums (e.g. {"count": tokens}) added up over microbatches.
LossFn = Callable[[Params, Batch], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; saved whole by `checkpoint.py`."""

  step: jax.Array  # int32 []: optimizer updates applied so far
  params: Params
  opt_state: optax.OptState
  key: jax.Array  # typed PRNG key, split by steps that sample (PPO)


# --- Schedule and optimizer -------------------------------------------------------


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `cfg.lr`, then cosine / linear decay to `lr * end_lr_ratio`.

  Config fields: lr, warmup_steps, decay ("cosine" | "linear" | "constant"),
  end_lr_ratio.
  """
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  peak, end = cfg.lr, cfg.lr * cfg.end_lr_ratio
  if cfg.decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=end)
  if cfg.decay in ("linear", "constant"):
    final = end if cfg.decay == "linear" else peak
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup),
         optax.linear_schedule(peak, final, max(total_steps - warmup, 1))],
        [warmup])
  raise ValueError(f"optim.decay={cfg.decay!r}: expected 'cosine', 'linear' or"
                   " 'constant'")


def decay_mask(params: Params) -> Params:
  """True where weight decay applies: every weight except norms and biases.

  Layers are stacked on a leading L axis, so a norm scale is 2-D here; the
  mask goes by parameter name, not by rank.
  """
  def keep(path, _):
    name = jax.tree_util.keystr(path)
    return not ("norm" in name or "bias" in name)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, params: Params
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW (decoupled decay, masked) on `schedule`.

  Config fields: the schedule's, plus b1, b2, eps, weight_decay, clip_norm
  (0 disables clipping). `params` may be abstract (`jax.ShapeDtypeStruct`s):
  only its tree and names are used, for the decay mask.
  """
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask(params))
  if cfg.clip_norm:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw), schedule
  return adamw, schedule


# --- Train state ----------------------------------------------------------------------


def init_train_state(params: Params, tx: optax.GradientTransformation,
                     key: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), key=key)


def train_state_shardings(tx: optax.GradientTransformation, abstract_params: Params,
                          param_shardings: Params, sharder: Sharder) -> TrainState:
  """Shardings of a TrainState: optimizer moments follow their parameters.

  Counters and the PRNG key are replicated. Used both as `out_shardings` of the
  jitted init and on the `eval_shape` targets a checkpoint restores into.
  """
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: sharder.replicated)
  return TrainState(step=sharder.replicated, params=param_shardings,
                    opt_state=opt_shardings, key=sharder.replicated)


def abstract_train_state(tx: optax.GradientTransformation, abstract_params: Params,
                         shardings: TrainState) -> TrainState:
  """`ShapeDtypeStruct`s carrying shardings: a restore target, no memory."""
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                        params=abstract_params,
                        opt_state=jax.eval_shape(tx.init, abstract_params),
                        key=jax.eval_shape(lambda: jax.random.key(0)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


# --- Gradients --------------------------------------------------------------------------


def split_microbatches(batch: Batch, num_microbatches: int,
                       sharder: Sharder | None = None) -> Batch:
  """[B, ...] -> [M, B/M, ...], row i of microbatch m being global row i*M + m.

  Interleaving keeps each device's contiguous block of rows on that device
  for every microbatch (a plain reshape would put whole microbatches on a
  subset of the devices).
  """
  def split(x):
    B = x.shape[0]
    if B % num_microbatches:
      raise ValueError(f"batch of {B} rows does not split into {num_microbatches}"
                       " microbatches")
    x = x.reshape(B // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)
    return constrain(sharder, x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params: Params, batch: Batch,
                         num_microbatches: int = 1, sharder: Sharder | None = None
                         ) -> tuple[Params, dict[str, jax.Array]]:
  """Gradient of the summed loss over the batch, and the summed stats.

  The loss is a sum (not a mean) per microbatch, so the total gradient is the
  sum of the microbatch gradients exactly; the caller divides by the count it
  wants to average over (e.g. loss tokens in the whole batch). Gradients are
  accumulated in float32.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    grads, stats = grad_fn(params, batch)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), stats

  micro = split_microbatches(batch, num_microbatches, sharder)

  def body(carry, mb):
    acc_grads, acc_stats = carry
    grads, stats = grad_fn(params, mb)
    acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
    acc_stats = jax.tree.map(jnp.add, acc_stats, stats)
    return (acc_grads, acc_stats), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  first = jax.tree.map(lambda x: x[0], micro)
  zero_stats = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_fn, params, first)[1])
  (grads, stats), _ = jax.lax.scan(body, (zeros, zero_stats), micro)
  return grads, stats


def apply_gradients(state: TrainState, grads: Params, tx: optax.GradientTransformation
                    ) -> TrainState:
  """One update. The optimizer state keeps its dtypes: with bfloat16 params, Adam's
  moments start bfloat16 (`tx.init`) but optax's update promotes them to float32
  when the gradients are float32 (they are, after the token-mean division), which
  would change the state's shapes-and-dtypes after step 1 (a recompile of every
  jitted step, donation that cannot alias, a checkpoint that no longer matches
  its restore target)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def all_finite(params: Params) -> jax.Array:
  """True when every parameter is finite (the steps' "finite" metric)."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))


# --- The train step ---------------------------------------------------------------------


def gradient_step(state: TrainState, batch: Batch, loss_fn: LossFn, *,
                  tx: optax.GradientTransformation, count: str, microbatches: int,
                  sharder: Sharder | None,
                  metrics: Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]],
                  schedule: optax.Schedule | None = None, finite: Sequence[str] = ("loss",)
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on the mean of `loss_fn`'s summed loss over the whole batch.

  g = (sum over microbatches of grad loss_sum) / max(stats[count], 1), so the loss
  is averaged over what `count` names (loss tokens, pairs); then one `tx` update.
  The metrics are `metrics(stats, that count)` plus "grad_norm" (of g), "lr" (the
  schedule at this step, when given) and "finite": every new parameter and each
  metric named in `finite` is finite.
  """
  grads, stats = accumulate_gradients(loss_fn, state.params, batch, microbatches, sharder)
  n = jnp.maximum(stats[count], 1.0)
  grads = jax.tree.map(lambda g: g / n, grads)
  new_state = apply_gradients(state, grads, tx)
  out = {**metrics(stats, n), "grad_norm": optax.global_norm(grads)}
  if schedule is not None:
    out["lr"] = schedule(state.step)
  ok = all_finite(new_state.params)
  for name in finite:
    if name in out:
      ok = ok & jnp.isfinite(out[name])
  out["finite"] = ok
  return new_state, out
