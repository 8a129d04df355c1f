"""The one PM scorer: every PM score outside PM training comes from here.

Stage 8's comparisons and revision-round scores, and PPO's reward, score
(prompt, response) conversations rendered by the one chat rule
(`text.chat.conversation_ids`, cut after the end-of-turn token) with the
score read at that last token, exactly as the PM was trained
(`preference.model.pair_rewards` uses the same `heads.sequence_scores`).

One padding rule: rows are right-padded to the next power of two of the
longest row (capped at `max_len`; a longer row keeps its last `max_len`
tokens, so the score's token stays), and the batch is a multiple of the
mesh's batch shards, filler rows holding one token and discarded. Few shapes
compile, and each compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from cai_jax import distributed
from cai_jax.model import heads
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.text import padding
from cai_jax.text.chat import conversation_ids
from cai_jax.text.tokenizer import Tokenizer


@functools.lru_cache(maxsize=16)
def _compiled(cfg: ModelConfig, sharder: Sharder | None):
  """One jitted scorer per (model config, mesh), shared by every Scorer: a new Scorer
  for the same model (stage 8 after PPO, each test) does not compile again."""
  fn = lambda p, ids, mask: heads.sequence_scores(p, ids, cfg, mask_BT=mask, sharder=sharder)
  if sharder is None:
    return jax.jit(fn)
  row_sh = sharder.sharding(("batch", None))
  return jax.jit(fn, in_shardings=(heads.scalar_model_shardings(cfg, sharder), row_sh, row_sh),
                 out_shardings=sharder.replicated)


class Scorer:
  """PM scores of conversations; `batch_size` rows per call (None: all at once)."""

  def __init__(self, cfg: ModelConfig, params: heads.Params, tok: Tokenizer, *,
               max_len: int, sharder: Sharder | None = None, batch_size: int | None = None):
    self.cfg, self.params, self.tok, self.max_len = cfg, params, tok, int(max_len)
    self.sharder = sharder
    self.multiple = 1 if sharder is None else sharder.batch_shards
    self.batch_size = (None if batch_size is None
                       else -(-max(1, batch_size) // self.multiple) * self.multiple)
    self._score = _compiled(cfg, sharder)
    self._row_sh = None if sharder is None else sharder.sharding(("batch", None))

  @classmethod
  def from_dir(cls, pm_dir: str, sharder: Sharder, batch_size: int | None = None
               ) -> "Scorer":
    """The scorer of a saved PM (stage 6's output dir), at the length it trained on."""
    from cai_jax.preference import saved
    cfg, params, tok = saved.restore_preference_model(pm_dir, sharder)
    return cls(cfg, params, tok, sharder=sharder, batch_size=batch_size,
               max_len=saved.read_info(pm_dir).get("seq_len") or cfg.max_seq_len)

  def score_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
    """[N] float32 scores of token-id conversations (each ends at its scored token)."""
    rows = [list(r)[-self.max_len:] for r in rows]
    out = np.zeros(len(rows), np.float32)
    step = self.batch_size or max(len(rows), 1)
    for start in range(0, len(rows), step):
      chunk = rows[start:start + step]
      n = len(chunk)
      B = self.batch_size or -(-n // self.multiple) * self.multiple
      S = min(self.max_len, padding.batch_bucket(max(len(r) for r in chunk)))
      ids_BS, mask_BS = padding.right_pad(chunk, S, self.tok.pad_id, num_rows=B)
      if self._row_sh is not None:
        ids_BS = distributed.to_global(ids_BS, self._row_sh)
        mask_BS = distributed.to_global(mask_BS, self._row_sh)
      scores = self._score(self.params, ids_BS, mask_BS)
      out[start:start + n] = np.asarray(distributed.to_host(scores))[:n]
    return out

  def conversations(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    return [conversation_ids(self.tok, p, r) for p, r in zip(prompts, responses)]

  def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """[N] float32 PM scores of (prompt, response) texts."""
    if not prompts:
      return np.zeros(0, np.float32)
    return self.score_ids(self.conversations(prompts, responses))
