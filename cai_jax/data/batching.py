"""Batch order, dataset mixing and held-out splits, shared by SFT (stage 3) and
the PM (stage 6).

The order of an epoch is a function of (seed, epoch) alone, so the data
position of a run is just its step and a resumed run sees exactly the
batches an uninterrupted one would. Rows are grouped by length bucket so that
each batch has one of a few shapes (each compiles once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")


def mix_by_ratio(first: Sequence[T], second: Sequence[T], second_ratio: float | None,
                 rng: np.random.Generator, names: tuple[str, str]) -> tuple[list[T], list[T]]:
  """Subsample the larger side so `second_ratio` of the result comes from `second`.

  None keeps everything, and so does a ratio strictly inside (0, 1) when one
  side is empty (with a warning: there is nothing to mix). Each side keeps its
  input order. `names` name the sides in messages.
  """
  first, second = list(first), list(second)
  if second_ratio is None:
    return first, second
  if not 0.0 <= second_ratio <= 1.0:
    raise ValueError(f"data.helpful_ratio={second_ratio}: must lie in [0, 1]")
  if 0.0 < second_ratio < 1.0 and not (first and second):
    logging.warning("data.helpful_ratio=%s: no %s examples to mix in; using the %d there are",
                    second_ratio, names[1] if first else names[0], len(first) + len(second))
    return first, second
  n1, n2 = len(first), len(second)
  if second_ratio == 0.0:
    n2 = 0
  elif second_ratio == 1.0:
    n1 = 0
  elif n2 >= round(n1 * second_ratio / (1 - second_ratio)):
    n2 = round(n1 * second_ratio / (1 - second_ratio))
  else:
    n1 = round(n2 * (1 - second_ratio) / second_ratio)
  first = [first[i] for i in sorted(rng.permutation(len(first))[:n1])]
  second = [second[i] for i in sorted(rng.permutation(len(second))[:n2])]
  return first, second


def split_held_out(items: Sequence[T], eval_size: int, seed: int, what: str
                   ) -> tuple[list[T], list[T]]:
  """(train, held-out): a fixed, seeded held-out set of `eval_size` items."""
  if eval_size >= len(items):
    raise ValueError(f"data.eval_size={eval_size} leaves no training {what} out of"
                     f" {len(items)}")
  order = np.random.default_rng([seed, 1]).permutation(len(items))
  held = set(order[:eval_size].tolist())
  return ([x for i, x in enumerate(items) if i not in held],
          [x for i, x in enumerate(items) if i in held])


def epoch_batches(buckets_E: np.ndarray, batch_size: int, seed: int, epoch: int
                  ) -> list[tuple[int, np.ndarray]]:
  """(bucket length, row indices) per batch, in this epoch's shuffled order.

  Rows are shuffled, grouped by bucket, cut into batches (the last of each
  bucket padded with -1, a row that adds nothing) and the batches shuffled
  again. The number of batches is the same every epoch.
  """
  rng = np.random.default_rng([seed, 2, epoch])
  order = rng.permutation(len(buckets_E))
  batches = []
  for T in np.unique(buckets_E):
    rows = order[buckets_E[order] == T]
    pad = -len(rows) % batch_size
    rows = np.concatenate([rows, np.full(pad, -1, rows.dtype)])
    batches += [(int(T), b) for b in rows.reshape(-1, batch_size)]
  return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(buckets_E: np.ndarray, batch_size: int) -> list[tuple[int, np.ndarray]]:
  """The held-out set in a fixed order, batched by bucket (padded with -1)."""
  out = []
  for T in np.unique(buckets_E):
    rows = np.flatnonzero(buckets_E == T)
    rows = np.concatenate([rows, np.full(-len(rows) % batch_size, -1, rows.dtype)])
    out += [(int(T), b) for b in rows.reshape(-1, batch_size)]
  return out


def batches_per_epoch(buckets_E: np.ndarray, batch_size: int) -> int:
  return sum(-(-int(n) // batch_size) for n in np.unique(buckets_E, return_counts=True)[1])


def length_buckets(buckets: Sequence[int], seq_len: int) -> list[int]:
  """The config's buckets plus seq_len, sorted; none may exceed seq_len."""
  out = sorted({*buckets, seq_len})
  if out[-1] != seq_len:
    raise ValueError(f"data.length_buckets {out} must not exceed seq_len")
  return out


class EpochOrder:
  """Step -> (bucket length, rows) of a training set, epoch after epoch.

  The position saved with a checkpoint is just the step; `position(step)`
  says where in which epoch it is.
  """

  def __init__(self, buckets_E: np.ndarray, batch_size: int, seed: int):
    self.buckets_E, self.batch_size, self.seed = buckets_E, batch_size, seed
    self.per_epoch = batches_per_epoch(buckets_E, batch_size)
    self._plans: dict[int, list[tuple[int, np.ndarray]]] = {}

  def batch(self, step: int) -> tuple[int, np.ndarray]:
    epoch, i = divmod(step, self.per_epoch)
    if epoch not in self._plans:
      self._plans.clear()
      self._plans[epoch] = epoch_batches(self.buckets_E, self.batch_size, self.seed, epoch)
    return self._plans[epoch][i]

  def position(self, step: int) -> dict[str, int]:
    epoch, i = divmod(step, self.per_epoch)
    return {"step": step, "epoch": epoch, "batch_in_epoch": i}


class Plan(NamedTuple):
  """A training stage's batches: bucketed rows of each split, the epoch order and
  the number of steps."""

  train_buckets: Any
  held_buckets: Any
  order: EpochOrder
  total_steps: int


def plan(train, held, data, train_config, seed: int, what: str) -> Plan:
  """The plan for token data sets `train` / `held` (SFT examples, PM pairs, DPO
  pairs: anything with `.buckets(lengths)` and `.size`) under a stage config's
  `data` (length_buckets, seq_len) and `train` (batch_size, num_steps or
  num_epochs) blocks; `what` names the rows in the log line."""
  buckets = length_buckets(data.length_buckets, data.seq_len)
  train_buckets, held_buckets = train.buckets(buckets), held.buckets(buckets)
  order = EpochOrder(train_buckets, train_config.batch_size, seed)
  total_steps = train_config.num_steps or train_config.num_epochs * order.per_epoch
  logging.info("%d train / %d held-out %s; %d steps (%d per epoch)", train.size, held.size,
               what, total_steps, order.per_epoch)
  return Plan(train_buckets, held_buckets, order, total_steps)
