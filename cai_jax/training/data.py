"""Dataset mixing and held-out splits shared by SFT (stage 3) and the PM (stage 6)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

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
