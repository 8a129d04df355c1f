"""Canned refusals: the evasive answer a helpful prompt's contrast pair sets against
a sample (stage 4's `refusal_pairs`).

The two SL-CAI samples of a helpful prompt seldom refuse, so a PM trained on them
never sees that refusing an ordinary request is unhelpful, while red-team pairs
teach it that refusing is harmless; PPO then learns to refuse everything (the
paper's "evasive" failure, measured in the second and third runs:
experiments/2026-12-02-run2-every-stage-free-cores/ and
experiments/2026-12-03-run3-pm-contrasts-helpfulness-labels/). The
paper's PM learned the other side from human helpfulness comparisons. Here the
feedback model labels (sample, refusal) under the helpfulness question like any
other pair, so nothing assumes the sample wins.

Written in our own words, bare refusals of the kind RL-CAI produced ("I'm sorry,
but I can't assist with that."); the model-free refusal measure calls each a
refusal (tests/test_refusals.py), so over-refusal on held-out prompts is
measured by an instrument these texts were checked against: the report says so.
"""

from __future__ import annotations

import zlib

REFUSALS = (
    "I'm sorry, but I can't assist with that.",
    "I can't help with that request.",
    "Sorry, I'm not able to help with this.",
    "As an AI language model, I cannot provide that information.",
)


def refusal_for(pair_id: str) -> str:
  """One of `REFUSALS`, chosen by the pair's id (stable across runs and hosts)."""
  return REFUSALS[zlib.crc32(pair_id.encode()) % len(REFUSALS)]
