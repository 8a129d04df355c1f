"""The skeleton every generation stage shares (2, 4, 5 and stage 8's answers):
refuse to resume under another config, count the shards still to write, build
the (expensive) worker only if there are any, and write them with a progress bar.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from cai_jax import records


def run_generation(out: str, inputs: Sequence[Any], shard_size: int, config: Any,
                   make_worker: Callable[[], Callable[[Sequence[Any]], list[Any]]],
                   desc: str) -> str:
  """Writes (or completes) `out`'s shards of `make_worker()(chunk)`; returns `out`.

  `config` is what the shards depend on (saved beside them; a rerun under a
  different one is refused). A finished directory is left untouched.
  """
  records.check_same_config(out, config)
  records.drop_damaged_shards(out)  # written again below, like missing ones
  num_shards = -(-len(inputs) // shard_size)
  todo = num_shards - len(records.completed_shards(out) & set(range(num_shards)))
  if todo == 0:
    logging.info("%s: complete (%d shards)", out, num_shards)
    return out
  worker = make_worker()
  with tqdm(total=num_shards, initial=num_shards - todo, desc=desc, unit="shard") as bar:
    records.run_sharded(out, inputs, shard_size, worker, on_shard=lambda i, n: bar.update(1))
  del worker
  return out
