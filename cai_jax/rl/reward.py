"""PPO's reward: the preference model's score of each rollout, through the one scorer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cai_jax.preference.scorer import Scorer
from cai_jax.text.tokenizer import Tokenizer

# reward_fn(prompt texts, response tokens [B, M], lengths [B]) -> scores [B] float32.
RewardFn = Callable[[Sequence[str], np.ndarray, np.ndarray], np.ndarray]


def pm_reward_fn(scorer: Scorer, policy_tok: Tokenizer) -> RewardFn:
  """Reward = PM score of [user prompt, assistant response] at its end-of-turn token.

  The response is decoded with the policy's tokenizer and re-rendered with
  the PM's chat template (the two may differ), then scored as the PM was
  trained (`preference.scorer`).
  """

  def reward(prompt_texts, tokens_BM, lengths_B):
    responses = [policy_tok.decode(toks[:length], skip_special_tokens=True).strip()
                 for toks, length in zip(tokens_BM, lengths_B)]
    return scorer.score_texts(list(prompt_texts), responses).astype(np.float32)

  return reward
