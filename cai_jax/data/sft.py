"""SFT examples: critique-revision records -> (prompt, response) -> token batches.

Red-team records give (prompt, response after `revision_round` revisions);
helpful records give (prompt, initial answer), mixed in so the model stays
helpful. Each pair is one chat through `text.chat.prompt_response_ids`; the
loss mask covers the response and its end-of-turn token only.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence

import numpy as np

from cai_jax import records
from cai_jax.data import batching
from cai_jax.text import padding
from cai_jax.text.chat import prompt_response_ids
from cai_jax.text.tokenizer import Tokenizer

TRUNCATIONS = ("truncate", "error")


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  kind: str  # "red_team" | "helpful"
  prompt: str
  response: str


def build_examples(recs: Sequence[records.CritiqueRevisionRecord], revision_round: int,
                   helpful_ratio: float | None, seed: int,
                   drop_reason: Callable[[str, str, str], str | None] | None = None
                   ) -> list[Example]:
  """Red-team (prompt, revision `revision_round`) + helpful (prompt, initial answer).

  `helpful_ratio` is the fraction of helpful examples in the mix (None: use
  every record). The larger side is subsampled, with `seed`, to hit it.
  `drop_reason(prompt, initial answer, revision)`, when given, names why a red-team
  revision is not worth learning (None keeps it; `evaluation.revision_filter`).
  """
  red, helpful, skipped = [], [], collections.Counter()
  for r in recs:
    if r.kind == "red_team":
      if revision_round > len(r.rounds) or (revision_round == -1 and not r.rounds):
        skipped["red_team record without the requested revision round"] += 1
        continue
      response = r.response_at(revision_round)
      bucket = red
      why = drop_reason(r.prompt, r.initial_response, response) if drop_reason else None
      if why:
        skipped[f"red-team revision dropped by the revision filter ({why})"] += 1
        continue
    elif r.kind == "helpful":
      response = r.initial_response
      bucket = helpful
    else:
      raise ValueError(f"record {r.id}: kind {r.kind!r}, expected 'red_team' or 'helpful'")
    if not response.strip() or not r.prompt.strip():
      skipped["empty prompt or response"] += 1
      continue
    bucket.append(Example(r.id, r.kind, r.prompt, response))
  for why, n in skipped.items():
    logging.warning("skipped %d records: %s", n, why)

  red, helpful = batching.mix_by_ratio(red, helpful, helpful_ratio,
                                       np.random.default_rng(seed), ("red-team", "helpful"))
  logging.info("SFT mix: %d red-team revisions + %d helpful answers", len(red), len(helpful))
  return red + helpful


@dataclasses.dataclass(frozen=True)
class TokenizedData:
  """Conversations as rows of token ids, right-padded to seq_len + 1."""

  tokens_ET: np.ndarray  # int32 [E, seq_len + 1]
  lengths_E: np.ndarray  # tokens in each conversation (prompt + response)
  prompt_lens_E: np.ndarray  # tokens before the first response token

  @property
  def size(self) -> int:
    return len(self.lengths_E)

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for a in (self.tokens_ET, self.lengths_E, self.prompt_lens_E):
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]

  def identity(self, batch_size: int, seed: int) -> dict:
    """What a checkpoint of training on this data must match to resume it."""
    return {"fingerprint": self.fingerprint(), "num_examples": self.size,
            "batch_size": batch_size, "seed": seed}

  def buckets(self, buckets: Sequence[int]) -> np.ndarray:
    """The smallest bucket length that holds each conversation's model inputs."""
    return padding.buckets_of(self.lengths_E - 1, buckets)


def check_truncation(truncation: str) -> None:
  if truncation not in TRUNCATIONS:
    raise ValueError(f"data.truncation={truncation!r}: expected 'truncate' or 'error'")


def tokenize_examples(tok: Tokenizer, examples: Sequence[Example], seq_len: int,
                      truncation: str) -> TokenizedData:
  """Render and tokenize; over-long conversations are truncated or rejected.

  truncation="truncate" cuts the response to fit seq_len model inputs (and
  drops an example whose prompt alone fills them); "error" raises.
  """
  check_truncation(truncation)
  rows, prompt_lens, truncated, dropped = [], [], 0, 0
  for ex in examples:
    prompt_ids, response_ids = prompt_response_ids(tok, ex.prompt, ex.response, ex.id)
    ids = prompt_ids + response_ids
    if len(ids) > seq_len + 1:
      if truncation == "error":
        raise ValueError(
            f"example {ex.id} ({ex.kind}) has {len(ids)} tokens, more than"
            f" data.seq_len + 1 = {seq_len + 1}; raise seq_len or set"
            " data.truncation='truncate'")
      if len(prompt_ids) >= seq_len:
        dropped += 1
        continue
      ids = ids[:seq_len + 1]
      truncated += 1
    rows.append(ids)
    prompt_lens.append(len(prompt_ids))
  if truncated or dropped:
    logging.warning("seq_len=%d: truncated %d responses, dropped %d examples whose"
                    " prompt alone is too long", seq_len, truncated, dropped)
  tokens, _ = padding.right_pad(rows, seq_len + 1, tok.pad_id)
  return TokenizedData(tokens, np.asarray([len(r) for r in rows], np.int32),
                       np.asarray(prompt_lens, np.int32))


def make_batch(data: TokenizedData, rows: np.ndarray, T: int, pad_id: int
               ) -> dict[str, np.ndarray]:
  """[B, T] arrays for `rows` (-1: an all-padding row that adds nothing).

    inputs      tokens 0..T-1           targets    tokens 1..T
    input_mask  real input tokens       loss_mask  targets that are response
  """
  valid = rows >= 0
  tokens = np.full((len(rows), T + 1), pad_id, np.int32)
  tokens[valid] = data.tokens_ET[rows[valid], :T + 1]
  lengths = np.where(valid, data.lengths_E[np.maximum(rows, 0)], 0)
  prompt = np.where(valid, data.prompt_lens_E[np.maximum(rows, 0)], 0)
  t = np.arange(T)[None]
  input_mask = t < (lengths - 1)[:, None]
  loss_mask = input_mask & (t >= (prompt - 1)[:, None])
  return {"inputs": tokens[:, :T], "targets": tokens[:, 1:], "input_mask": input_mask,
          "loss_mask": loss_mask}


def pack(lengths: Sequence[int], T: int) -> list[list[int]]:
  """First-fit decreasing: the indices of `lengths` grouped into rows of at most T tokens
  (each length <= T), longest first, each row's members in their input order."""
  rows: list[list[int]] = []
  room: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    for r, left in enumerate(room):
      if lengths[i] <= left:
        rows[r].append(i)
        room[r] -= lengths[i]
        break
    else:
      rows.append([i])
      room.append(T - lengths[i])
  return [sorted(r) for r in rows]


def make_packed_batch(data: TokenizedData, rows: np.ndarray, T: int, pad_id: int,
                      row_multiple: int = 1) -> dict[str, np.ndarray]:
  """`make_batch`'s conversations packed several to a row of T inputs: the same tokens,
  targets and loss mask, with `segments` (1, 2, ... per conversation, 0 on padding) and
  `positions` restarting at 0 in each conversation, so attention and RoPE stay within
  one conversation (`transformer.hidden_states(segment_ids_BT=...)`). The number of rows
  is the packer's, rounded up to a multiple of `row_multiple` (microbatches x batch
  shards): at most batch_size / row_multiple shapes per length bucket compile. (Rounding
  to a power of two instead, fewer shapes, kept 0.34 of a real run's SFT tokens padding
  against 0.24 exact and 0.42 unpacked.)"""
  valid = rows[rows >= 0]
  n_in = [int(data.lengths_E[r]) - 1 for r in valid]  # model inputs per conversation
  groups = pack(n_in, T)
  R = -(-len(groups) // row_multiple) * row_multiple
  inputs = np.full((R, T), pad_id, np.int32)
  targets = np.full((R, T), pad_id, np.int32)
  input_mask = np.zeros((R, T), bool)
  loss_mask = np.zeros((R, T), bool)
  segments = np.zeros((R, T), np.int32)
  positions = np.zeros((R, T), np.int32)
  for r, group in enumerate(groups):
    at = 0
    for seg, i in enumerate(group, start=1):
      e, n = valid[i], n_in[i]
      tok = data.tokens_ET[e]
      inputs[r, at:at + n] = tok[:n]
      targets[r, at:at + n] = tok[1:n + 1]
      input_mask[r, at:at + n] = True
      t = np.arange(n)
      loss_mask[r, at:at + n] = t >= int(data.prompt_lens_E[e]) - 1
      segments[r, at:at + n] = seg
      positions[r, at:at + n] = t
      at += n
  return {"inputs": inputs, "targets": targets, "input_mask": input_mask,
          "loss_mask": loss_mask, "segments": segments, "positions": positions}
