"""Rows of token ids to fixed-shape arrays, and the length buckets that bound
how many shapes compile.

Left padding is for prompts that a model continues (sampling, option
scoring, the PPO score pass): every row's last token sits in the last
column. Right padding is for whole sequences read from the start (SFT, the
PM): a row's tokens start at column 0 and its last real token is found from
the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int, num_rows: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """int32 tokens and bool mask [num_rows, length]; rows end in the last column.

  Rows beyond `len(rows)` (filler up to `num_rows`) get one real token in the
  last column, so every row attends to something; their outputs are discarded.
  """
  n = len(rows) if num_rows is None else num_rows
  tokens = np.full((n, length), pad_id, np.int32)
  mask = np.zeros((n, length), bool)
  for i, ids in enumerate(rows):
    if len(ids):
      tokens[i, length - len(ids):] = ids
      mask[i, length - len(ids):] = True
  mask[len(rows):, -1] = True
  return tokens, mask


def right_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int,
              num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """int32 tokens and bool mask [num_rows, length]; rows start in column 0.

  Filler rows beyond `len(rows)` get one real token in column 0 (discarded).
  """
  n = len(rows) if num_rows is None else num_rows
  tokens = np.full((n, length), pad_id, np.int32)
  mask = np.zeros((n, length), bool)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids)] = True
  mask[len(rows):, 0] = True
  return tokens, mask


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest of the (sorted) `buckets` that holds `n`."""
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]};"
                   " raise the length buckets or truncate")


def buckets_of(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  """Vectorised `bucket`: the smallest bucket holding each length."""
  edges = np.asarray(sorted(buckets))
  return edges[np.searchsorted(edges, np.asarray(lengths))]


def batch_bucket(n: int, multiple: int = 1) -> int:
  """Next power of two (at least `multiple`, and a multiple of it)."""
  size = 1 << max(0, (n - 1).bit_length())
  size = max(size, multiple)
  return -(-size // multiple) * multiple
