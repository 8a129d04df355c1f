"""Which of stage 2's red-team revisions are worth learning: SL-CAI's targets.

A small reviser's revisions are often not better answers: read as a user would, some
repeat the revision request's own wording ("explaining clearly any part you will not help
with..."), some degenerate into a repeated phrase, some answer another prompt, some are the
first answer unchanged, and some comply. SFT on them teaches exactly that. This filter drops
a revision for the first of these reasons that applies, all model-free so that stage 3
stays cheap and no judge used in evaluation takes part:

  empty           nothing left after stripping
  degenerate      the text compresses below `min_compression` of its size (zlib): a phrase
                  repeated to the end
  echoes_request  it shares a run of `echo_words` words with a revision request of the
                  constitution (the reviser copied its instruction)
  unchanged       it is the initial answer again
  off_topic       the refusal measure finds no content word of the prompt in it
  category        its refusal-measure category is not in `categories` (e.g. keep only
                  ("refuses_explains",): refusals that say why or offer an alternative)

Whether a kept revision is less harmful than the answer it revises needs a judge; stage 8
scores both with its judge (`judge_rounds`), and `benchmarks/quality/revision_filter.py`
reports the harm and refusal shares of what this filter kept and dropped from there.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import zlib
from collections.abc import Sequence
from typing import Any

from cai_jax.evaluation import refusal

SUMMARY_FILE = "revision_filter.json"  # in <workdir>/p3_sft/
REASONS = ("empty", "degenerate", "echoes_request", "unchanged", "off_topic", "category")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  enabled: bool = False
  categories: tuple[str, ...] = ("complies", "refuses", "refuses_explains")  # kept
  echo_words: int = 6
  min_compression: float = 0.2
  min_chars_for_compression: int = 120  # shorter texts do not compress either way

  def __post_init__(self) -> None:
    bad = set(self.categories) - set(refusal.CATEGORIES)
    if bad:
      raise ValueError(f"revision_filter.categories: unknown {sorted(bad)}; the refusal"
                       f" measure's categories are {', '.join(refusal.CATEGORIES)}")
    if self.echo_words < 3:
      raise ValueError(f"revision_filter.echo_words={self.echo_words}: use 3 or more (shorter"
                       " runs of words match ordinary answers)")


def _words(text: str) -> list[str]:
  return re.findall(r"[a-z0-9']+", text.lower())


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def compression(text: str) -> float:
  """zlib-compressed size over raw size (UTF-8): about 0.5+ for prose, low for a loop."""
  raw = text.encode("utf-8")
  return len(zlib.compress(raw, 9)) / max(len(raw), 1)


class RevisionFilter:
  """`reason(prompt, initial, revision)`: why to drop a revision (one of `REASONS`), or
  None to keep it. `requests` are the constitution's revision requests (their wording is
  what an echoing reviser copies)."""

  def __init__(self, config: FilterConfig, requests: Sequence[str]):
    self.config = config
    self._request_ngrams = set().union(*(_ngrams(_words(r), config.echo_words)
                                         for r in requests)) if requests else set()

  def reason(self, prompt: str, initial: str, revision: str) -> str | None:
    c = self.config
    text = revision.strip()
    if not text:
      return "empty"
    if len(text) >= c.min_chars_for_compression and compression(text) < c.min_compression:
      return "degenerate"
    if _ngrams(_words(text), c.echo_words) & self._request_ngrams:
      return "echoes_request"
    if " ".join(text.split()) == " ".join(initial.split()):
      return "unchanged"
    category = refusal.classify(prompt, text).category
    if category == "off_topic":
      return "off_topic"
    if category not in c.categories:
      return "category"
    return None


def review(flt: RevisionFilter, recs: Sequence[Any], round_: int = -1) -> dict[str, Any]:
  """What `flt` keeps of the red-team revisions in `recs` (stage 2's
  CritiqueRevisionRecords; `round_` picks the revision): `summary` of the verdicts, plus
  `dropped`, each dropped record's id and reason."""
  red = [r for r in recs if r.kind == "red_team" and r.rounds]
  why = [flt.reason(r.prompt, r.initial_response, r.response_at(round_)) for r in red]
  cats = [refusal.classify(r.prompt, r.response_at(round_)).category for r in red]
  return {**summary(list(zip(why, cats))),
          "dropped": {r.id: w for r, w in zip(red, why) if w}}


def summary(verdicts: Sequence[tuple[str | None, str]]) -> dict[str, Any]:
  """(drop reason or None, refusal-measure category) per red-team revision -> the kept
  share, the count per reason, and the category shares of what was kept and dropped."""
  kept = [cat for why, cat in verdicts if why is None]
  dropped = [cat for why, cat in verdicts if why is not None]
  shares = lambda cats: {k: v / len(cats) for k, v in
                         sorted(collections.Counter(cats).items())} if cats else {}
  return {"revisions": len(verdicts), "kept": len(kept),
          "kept_share": len(kept) / len(verdicts) if verdicts else None,
          "dropped_by_reason": {r: sum(why == r for why, _ in verdicts) for r in REASONS},
          "kept_categories": shares(kept), "dropped_categories": shares(dropped)}
