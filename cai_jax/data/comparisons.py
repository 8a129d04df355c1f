"""PM comparisons: (prompt, response a, response b, p = P(a preferred)) -> token batches.

  * harmlessness: stage 5's AI labels on red-team pairs (soft p);
  * helpfulness: human chosen/rejected pairs from a JSONL / JSON / CSV /
    Parquet file (read with `datasets`; p = 1 for chosen), or stage 5's AI
    labels on helpful pairs.

Each response is the chat [user: prompt, assistant: response] through
`text.chat.conversation_ids`, cut after the end-of-turn token, where the PM
reads its score. Over-long conversations lose their *start* (the score's
token must stay).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Sequence

import jax
import numpy as np

from cai_jax import files, records
from cai_jax.data import batching
from cai_jax.data.sft import check_truncation
from cai_jax.model.sharding import Sharder
from cai_jax.text import padding
from cai_jax.text.chat import prompt_response_ids
from cai_jax.text.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Comparison:
  id: str
  kind: str  # "red_team" | "helpful"
  prompt: str
  response_a: str
  response_b: str
  p_a: float  # P(response_a preferred)


def read_ai_labels(labels_dir: str) -> list[Comparison]:
  """Stage 5's `LabelRecord`s as comparisons (every kind)."""
  recs = records.read_records(labels_dir, records.LabelRecord)
  out = []
  for r in recs:
    if not 0.0 <= r.p_a <= 1.0 or not math.isfinite(r.p_a):
      raise ValueError(f"{labels_dir}: record {r.id} has p_a={r.p_a}, outside [0, 1]")
    out.append(Comparison(r.id, r.kind, r.prompt, r.response_a, r.response_b, float(r.p_a)))
  return out


_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_human_comparisons(path: str) -> list[Comparison]:
  """Human helpfulness comparisons: prompt, chosen, rejected columns -> p_a = 1."""
  import datasets
  ext = os.path.splitext(path)[1].lower()
  if ext not in _BUILDERS:
    raise ValueError(f"data.helpful_comparisons={path}: expected a {sorted(_BUILDERS)} file")
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.helpful_comparisons={path}: no such file")
  if ext == ".jsonl":  # our checks first: one line naming the file, line and fix
    for line_no, row in files.iter_jsonl(
        path, "comparison file", '{"prompt": "...", "chosen": "...", "rejected": "..."}'):
      files.require(row, dict.fromkeys(("prompt", "chosen", "rejected"), str),
                    f"{path}:{line_no}", "each row needs the prompt and the chosen and"
                    " rejected responses as strings")
  elif ext == ".parquet":
    files.check_readable(path, "comparison file")
  else:
    files.read_text(path, "comparison file")
  try:
    ds = datasets.load_dataset(_BUILDERS[ext], data_files=path, split="train")
  except Exception as e:  # noqa: BLE001 - a file datasets cannot parse, named with the fix
    raise files.InputFileError(
        f"{path}: cannot be read as {ext} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); check the file's format") from None
  if len(ds) == 0:
    raise files.InputFileError(f"{path}: holds no comparisons; it needs at least one row")
  missing = {"prompt", "chosen", "rejected"} - set(ds.column_names)
  if missing:
    raise ValueError(f"{path}: missing column(s) {sorted(missing)}; have {ds.column_names}"
                     " (each row needs the prompt and the chosen and rejected responses)")
  ids = ds["id"] if "id" in ds.column_names else [f"human-{i}" for i in range(len(ds))]
  return [Comparison(str(i), "helpful", p, c, r, 1.0)
          for i, p, c, r in zip(ids, ds["prompt"], ds["chosen"], ds["rejected"])]


def mix(harmless: Sequence[Comparison], helpful: Sequence[Comparison],
        helpful_ratio: float | None, seed: int) -> list[Comparison]:
  """`helpful_ratio` of the result is helpful; the larger side is subsampled.

  None keeps everything, and so does a ratio strictly inside (0, 1) when one
  side is empty (with a warning: there is nothing to mix). Order: harmless
  then helpful, each in input order.
  """
  harmless, helpful = batching.mix_by_ratio(
      harmless, helpful, helpful_ratio, np.random.default_rng([seed, 3]),
      ("harmlessness", "helpful"))
  return harmless + helpful


def load_split(labels_dir: str | None, helpful_comparisons: str, helpful_ratio: float | None,
               eval_size: int, seed: int) -> tuple[list[Comparison], list[Comparison]]:
  """(train, held-out) comparisons: stage 5's red-team labels (`labels_dir`, None:
  none) mixed with helpfulness pairs (the human file when given, else stage 5's
  helpful labels) at `helpful_ratio`, then split, seeded. The PM and DPO read the
  same split from the same config fields, so DPO's held-out pairs are the PM's.
  Stage 4's refusal pairs (a sample against a canned refusal) always train: held
  out, they would be easy pairs inflating the held-out accuracy of the method's own
  pairs, and the split of the others stays what it is without them."""
  ai = read_ai_labels(labels_dir) if labels_dir else []
  harmless = [c for c in ai if c.kind == "red_team"]
  helpful = (read_human_comparisons(helpful_comparisons) if helpful_comparisons
             else [c for c in ai if c.kind == "helpful"])
  mixed = mix(harmless, helpful, helpful_ratio, seed)
  logging.info("comparisons: %d harmlessness (AI) + %d helpfulness (%s)",
               sum(c.kind == "red_team" for c in mixed), sum(c.kind == "helpful" for c in mixed),
               "human" if helpful_comparisons else "AI")
  contrasts = [c for c in mixed if records.pair_source(c) == "refusal"]
  mixed = [c for c in mixed if records.pair_source(c) != "refusal"]
  if len(mixed) <= eval_size:
    raise ValueError(f"{len(mixed)} comparisons, need more than data.eval_size={eval_size}")
  train, held_out = batching.split_held_out(mixed, eval_size, seed, "pairs")
  return train + contrasts, held_out


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
  """Both conversations of each pair, right-padded to seq_len."""

  tokens_E2T: np.ndarray  # int32 [E, 2, seq_len]
  lengths_E2: np.ndarray  # real tokens of each conversation
  p_a_E: np.ndarray  # float32 soft labels
  red_team_E: np.ndarray  # bool: a harmlessness comparison
  # Tokens before the first response token (after any cut): DPO scores the rest.
  # Not in the fingerprint: the PM reads whole conversations.
  prompt_lens_E2: np.ndarray

  @property
  def size(self) -> int:
    return len(self.p_a_E)

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for a in (self.tokens_E2T, self.lengths_E2, self.p_a_E, self.red_team_E):
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]

  def identity(self, batch_size: int, seed: int) -> dict:
    """What a checkpoint of training on these pairs must match to resume it."""
    return {"fingerprint": self.fingerprint(), "num_pairs": self.size,
            "batch_size": batch_size, "seed": seed}

  def buckets(self, buckets: Sequence[int]) -> np.ndarray:
    """The smallest bucket length holding both conversations of each pair."""
    return padding.buckets_of(self.lengths_E2.max(axis=1), buckets)


def fit(ids: list[int], seq_len: int, truncation: str, what: str) -> tuple[list[int], bool]:
  """(ids, truncated): too-long conversations keep their last seq_len tokens."""
  if len(ids) <= seq_len:
    return ids, False
  if truncation == "error":
    raise ValueError(f"{what} has {len(ids)} tokens, more than data.seq_len={seq_len};"
                     " raise seq_len or set data.truncation='truncate'")
  return ids[-seq_len:], True


def tokenize_pairs(tok: Tokenizer, comparisons: Sequence[Comparison], seq_len: int,
                   truncation: str) -> TokenizedPairs:
  check_truncation(truncation)
  E = len(comparisons)
  tokens = np.full((E, 2, seq_len), tok.pad_id, np.int32)
  lengths = np.zeros((E, 2), np.int32)
  prompt_lens = np.zeros((E, 2), np.int32)
  truncated = 0
  for i, c in enumerate(comparisons):
    for j, response in enumerate((c.response_a, c.response_b)):
      what = f"comparison {c.id} response {'ab'[j]}"
      prompt_ids, response_ids = prompt_response_ids(tok, c.prompt, response, what)
      full = prompt_ids + response_ids
      ids, cut = fit(full, seq_len, truncation, what)
      truncated += cut
      tokens[i, j, :len(ids)] = ids
      lengths[i, j] = len(ids)
      prompt_lens[i, j] = max(len(prompt_ids) - (len(full) - len(ids)), 0)
  if truncated:
    logging.warning("seq_len=%d: %d conversations lost their start", seq_len, truncated)
  return TokenizedPairs(tokens, lengths, np.asarray([c.p_a for c in comparisons], np.float32),
                        np.asarray([c.kind == "red_team" for c in comparisons], bool),
                        prompt_lens)


def make_batch(data: TokenizedPairs, rows: np.ndarray, T: int, with_responses: bool = False
               ) -> dict[str, np.ndarray]:
  """[B, 2, T] tokens and mask, [B] labels for `rows` (-1: a padding pair).

  with_responses adds "response_mask" [B, 2, T]: the response tokens (with the
  end-of-turn token) that a policy's log-probability of the response sums over.
  """
  valid = rows >= 0
  safe = np.maximum(rows, 0)
  tokens = np.where(valid[:, None, None], data.tokens_E2T[safe, :, :T], 0).astype(np.int32)
  lengths = np.where(valid[:, None], data.lengths_E2[safe], 0)
  positions = np.arange(T)[None, None]
  mask = positions < lengths[..., None]
  batch = {"tokens": tokens, "mask": mask,
           "p_a": np.where(valid, data.p_a_E[safe], 0.5).astype(np.float32),
           "valid": valid}
  if with_responses:
    starts = np.where(valid[:, None], data.prompt_lens_E2[safe], 0)
    batch["response_mask"] = mask & (positions >= starts[..., None])
  return batch


def batch_shardings(sharder: Sharder, with_responses: bool = False
                    ) -> dict[str, jax.sharding.Sharding]:
  """Pairs split over the batch axes; both members of a pair on one device."""
  out = {"tokens": sharder.sharding(("batch", None, "seq")),
         "mask": sharder.sharding(("batch", None, "seq")),
         "p_a": sharder.sharding(("batch",)), "valid": sharder.sharding(("batch",))}
  if with_responses:
    out["response_mask"] = sharder.sharding(("batch", None, "seq"))
  return out

