"""Stage 7's reward: a weighted sum of named sources, each optionally normalised.

  reward = sum_i w_i * norm_i(s_i(prompt, response))

`config.reward.sources` names them as "name=weight,name=weight" (default "pm=1"):

  pm         the stage-6 preference model's score at the end-of-turn token,
             through the one scorer (`preference.scorer`), as it was trained:
             from the sampled token ids when the PM and the policy share a
             tokenizer (`reward.pm_input`: "auto" / "ids"), else by decoding
             and re-rendering the text ("text");
  helpful_pm a second preference model, read from `reward.helpful_pm`, the same way:
             the paper's mixture of a helpfulness and a harmlessness signal, where a
             PM was trained on helpfulness pairs alone (stage 6 in another workdir,
             e.g. on `data.helpful_comparisons` with human labels);
  gated      the two PMs of stage 6's `pms="by_kind"` (Llama 2, Sec. 3.2.3): every
             rollout is scored by the harmlessness PM (`reward_model`) and the
             helpfulness PM (`reward.helpful_pm`), each standardised by its own
             running mean and std over every rollout it scored; a red-team prompt's
             reward is the harmlessness score, a helpful prompt's the helpfulness
             score, and a prompt of unknown kind takes the harmlessness score when
             sigmoid(it) < `reward.gate.threshold` (the unsafe case), else the
             helpfulness score (`reward.gate.rule="llama2"` applies that rule to
             helpful prompts too, as Llama 2 does); `GatedReward`;
  feedback   the feedback model itself, live (RLAIF without a distilled PM, an
             ablation of it): each rollout's pointwise Yes/No log-odds under one
             constitution principle, exactly the stage-5 labeler's pointwise
             score of that response (`feedback.labeler.Labeler.response_scores`);
  feedback_by_kind
             the feedback model live, asked stage 5's question for each rollout's
             prompt kind: the harm question (`reward.feedback.principle`) of a
             red-team prompt's response, the helpfulness question (stage 5's
             `helpful_labels="helpfulness"`) of a helpful prompt's: a prompt-aware
             reward, where one PM (or one question) scores every prompt alike;
  overlong   a rule: -(tokens beyond `reward.overlong_after`) / (the tokens
             left up to rollout.max_new_tokens), 0 for responses not longer;
  refusal    a rule: -1 for a response the model-free refusal measure
             (`evaluation.refusal`) calls a refusal of a helpful prompt, else 0.

(A response cut at rollout.max_new_tokens with no end of turn loses
`reward.no_eos_penalty` on top, in the learner.)

With `reward.normalize`, each source's scores are standardised by that source's
running mean and standard deviation over every rollout so far (Welford, this
batch included) before weighting, so that weights compare sources of different
scales; the running moments ride in the checkpoint's data position, so a
resumed run normalises exactly as an uninterrupted one. Each source's raw mean
is logged per iteration as `reward/<name>`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cai_jax.preference.scorer import Scorer
from cai_jax.text.chat import conversation_ids, prompt_response_ids
from cai_jax.text.tokenizer import Tokenizer

# reward_fn(prompt texts, response tokens [B, M], lengths [B]) -> scores [B] float32.
RewardFn = Callable[[Sequence[str], np.ndarray, np.ndarray], np.ndarray]
SOURCES = ("pm", "helpful_pm", "gated", "feedback", "feedback_by_kind", "overlong", "refusal")
NORM_EPS = 1e-6


def parse_sources(spec: str) -> list[tuple[str, float]]:
  """"pm=1,feedback=0.5" -> [("pm", 1.0), ("feedback", 0.5)], with one-line errors."""
  out: list[tuple[str, float]] = []
  for part in (p.strip() for p in spec.split(",")):
    name, sep, weight = part.partition("=")
    name = name.strip()
    if name not in SOURCES:
      raise ValueError(f"reward.sources={spec!r}: unknown source {name!r}; sources are"
                       f" {list(SOURCES)}, written name=weight,name=weight")
    try:
      w = float(weight) if sep else 1.0
    except ValueError:
      raise ValueError(f"reward.sources={spec!r}: weight {weight!r} of {name!r} is not a"
                       " number") from None
    if name in dict(out):
      raise ValueError(f"reward.sources={spec!r}: {name!r} repeats")
    if not math.isfinite(w):
      raise ValueError(f"reward.sources={spec!r}: {name!r} has a non-finite weight")
    out.append((name, w))
  return out


def decode_responses(tok: Tokenizer, tokens_BM: np.ndarray, lengths_B: np.ndarray
                     ) -> list[str]:
  """The responses as text, as every text-reading source sees them."""
  return [tok.decode(toks[:length], skip_special_tokens=True).strip()
          for toks, length in zip(tokens_BM, lengths_B)]


def pm_reward_fn(scorer: Scorer, policy_tok: Tokenizer) -> RewardFn:
  """Reward = PM score of [user prompt, assistant response] at its end-of-turn token.

  The response is decoded with the policy's tokenizer and re-rendered with
  the PM's chat template (the two may differ), then scored as the PM was
  trained (`preference.scorer`).
  """

  def reward(prompt_texts, tokens_BM, lengths_B):
    responses = decode_responses(policy_tok, tokens_BM, lengths_B)
    return scorer.score_texts(list(prompt_texts), responses).astype(np.float32)

  return reward


def shares_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
  """Whether two tokenizers give the same ids: vocabulary size, end-of-turn ids, chat
  template and the ids of a probe conversation (the default pipeline: the PM
  starts from SL-CAI, so both are SmolLM2's)."""
  probe = "Is 2 + 2 = 4? Yes, it is \u00e9t\u00e9 \u4f60\u597d."
  return (a.vocab_size == b.vocab_size and tuple(a.eos_ids) == tuple(b.eos_ids)
          and a.chat_template == b.chat_template
          and conversation_ids(a, probe, probe) == conversation_ids(b, probe, probe))


def pm_ids_reward_fn(scorer: Scorer, prompt_ids: Mapping[str, Sequence[int]]) -> RewardFn:
  """The PM's score of each rollout from its token ids, with no text round trip,
  when the PM and the policy share a tokenizer (`shares_tokenizer`).

  The conversation is the rollout's prompt ids (`prompt_ids[text]`, the
  generation prompt the policy sampled from) + its response ids up to and
  including the first end-of-turn token, which is appended when the response
  was cut at rollout.max_new_tokens: what `text.chat.conversation_ids` gives
  for the decoded text whenever the sampled ids are the tokenizer's own
  encoding of it. Scored by the one scorer, one jitted call per batch.
  """
  eos = tuple(scorer.tok.eos_ids)
  # The token the one chat rule ends an assistant turn with (ChatML: <|im_end|>).
  end_of_turn = prompt_response_ids(scorer.tok, "?", "!")[1][-1]

  def reward(prompt_texts, tokens_BM, lengths_B):
    tokens_BM, lengths_B = np.asarray(tokens_BM), np.asarray(lengths_B)
    M = tokens_BM.shape[1]
    is_end_BM = np.isin(tokens_BM, eos) & (np.arange(M)[None] < lengths_B[:, None])
    has_end_B = is_end_BM.any(axis=1)
    stop_B = np.where(has_end_B, is_end_BM.argmax(axis=1) + 1, lengths_B)
    rows = [list(prompt_ids[text]) + tokens_BM[b, :stop_B[b]].tolist()
            + ([] if has_end_B[b] else [end_of_turn]) for b, text in enumerate(prompt_texts)]
    return scorer.score_ids(rows)

  return reward


def pm_source(scorer: Scorer, policy_tok: Tokenizer, prompt_ids: Mapping[str, Sequence[int]],
              pm_input: str = "auto") -> RewardFn:
  """The `pm` source as `reward.pm_input` asks: "ids" (`pm_ids_reward_fn`, needs a
  shared tokenizer), "text" (`pm_reward_fn`) or "auto" (ids when shared)."""
  if pm_input not in ("auto", "ids", "text"):
    raise ValueError(f"reward.pm_input={pm_input!r}: use auto, ids or text")
  shared = pm_input != "text" and shares_tokenizer(policy_tok, scorer.tok)
  if pm_input == "ids" and not shared:
    raise ValueError("reward.pm_input='ids' but the PM's tokenizer differs from the"
                     " policy's; use auto or text")
  logging.info("PM reward from %s", "token ids" if shared else "decoded text")
  return pm_ids_reward_fn(scorer, prompt_ids) if shared else pm_reward_fn(scorer, policy_tok)


def feedback_reward_fn(labeler, principle_id: str, policy_tok: Tokenizer) -> RewardFn:
  """The feedback model's pointwise good-answer log-odds of each response under
  `principle_id` (a `feedback.labeler.Labeler`; mean over its models)."""
  labeler.constitution.comparison_principle(principle_id)  # names the file when unknown

  def reward(prompt_texts, tokens_BM, lengths_B):
    responses = decode_responses(policy_tok, tokens_BM, lengths_B)
    return labeler.response_scores(list(prompt_texts), responses,
                                   principle_id).astype(np.float32)

  return reward


def feedback_by_kind_reward_fn(labelers: Mapping[str, tuple[object, str]],
                               kinds: Mapping[str, str], policy_tok: Tokenizer) -> RewardFn:
  """Each rollout's pointwise good-answer log-odds under its prompt kind's
  (labeler, principle): `labelers["red_team"]`, `labelers["helpful"]`."""
  for labeler, principle in labelers.values():
    labeler.constitution.comparison_principle(principle)  # names the file when unknown

  def reward(prompt_texts, tokens_BM, lengths_B):
    responses = decode_responses(policy_tok, tokens_BM, lengths_B)
    out = np.zeros(len(responses), np.float32)
    unknown = sorted({kinds.get(p) for p in prompt_texts} - set(labelers), key=str)
    if unknown:
      raise ValueError(f"reward source feedback_by_kind: prompt kind(s) {unknown} have no"
                       f" question; kinds with one: {sorted(labelers)}")
    for kind, (labeler, principle) in labelers.items():
      rows = [i for i, p in enumerate(prompt_texts) if kinds[p] == kind]
      if rows:
        out[rows] = labeler.response_scores([prompt_texts[i] for i in rows],
                                            [responses[i] for i in rows], principle)
    return out

  return reward


def overlong_reward_fn(after: int, max_new_tokens: int) -> RewardFn:
  """-(length - after) / (max_new_tokens - after) for responses longer than `after`."""
  if not 0 <= after < max_new_tokens:
    raise ValueError(f"reward.overlong_after={after} must be in [0, rollout.max_new_tokens="
                     f"{max_new_tokens})")

  def reward(prompt_texts, tokens_BM, lengths_B):
    del prompt_texts, tokens_BM
    over = np.maximum(np.asarray(lengths_B, np.float64) - after, 0.0)
    return (-over / (max_new_tokens - after)).astype(np.float32)

  return reward


def refusal_reward_fn(policy_tok: Tokenizer, kinds: Mapping[str, str]) -> RewardFn:
  """-1 where a helpful prompt's response is a refusal (`evaluation.refusal`)."""
  from cai_jax.evaluation import refusal

  def reward(prompt_texts, tokens_BM, lengths_B):
    responses = decode_responses(policy_tok, tokens_BM, lengths_B)
    return np.array([-1.0 if kinds.get(p) == "helpful" and
                     refusal.classify(p, r).category in refusal.REFUSING else 0.0
                     for p, r in zip(prompt_texts, responses)], np.float32)

  return reward


@dataclasses.dataclass
class Moments:
  """Running count, mean and sum of squared deviations (Welford / Chan et al.)."""

  count: float = 0.0
  mean: float = 0.0
  m2: float = 0.0

  def update(self, x: np.ndarray) -> None:
    x = np.asarray(x, np.float64)
    if not x.size:
      return
    n, mean = float(x.size), float(x.mean())
    m2 = float(((x - mean) ** 2).sum())
    total = self.count + n
    delta = mean - self.mean
    self.m2 += m2 + delta * delta * self.count * n / total
    self.mean += delta * n / total
    self.count = total

  @classmethod
  def from_state(cls, state: Mapping[str, float]) -> "Moments":
    return cls(**{k: float(v) for k, v in state.items()})

  @property
  def std(self) -> float:
    return math.sqrt(self.m2 / self.count) if self.count else 0.0


GATE_RULES = ("kind", "llama2")
GATED_KINDS = ("red_team", "helpful")


class GatedReward:
  """The `gated` source: each prompt kind's PM, each standardised (module docstring).

  Both PMs score every rollout, so both running moments see the same rollouts and the
  threshold rule can read the harmlessness score of any prompt. `moments` ride in the
  checkpoint through `WeightedReward.state`; `last` holds the batch's raw mean of each
  PM and the share of rollouts the harmlessness PM judged."""

  def __init__(self, harm: RewardFn, helpful: RewardFn, kinds: Mapping[str, str],
               threshold: float = 0.15, rule: str = "kind"):
    if rule not in GATE_RULES:
      raise ValueError(f"reward.gate.rule={rule!r}: use one of {list(GATE_RULES)}")
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"reward.gate.threshold={threshold}: a probability in [0, 1]")
    self.harm, self.helpful, self.kinds = harm, helpful, kinds
    self.threshold, self.rule = threshold, rule
    self.moments = {"harm": Moments(), "helpful": Moments()}
    self.last: dict[str, float] = {}

  def __call__(self, prompt_texts, tokens_BM, lengths_B) -> np.ndarray:
    z = {}
    for name, fn in (("harm", self.harm), ("helpful", self.helpful)):
      s = np.asarray(fn(prompt_texts, tokens_BM, lengths_B), np.float64)
      self.last[f"{name}_pm"] = float(s.mean())
      m = self.moments[name]
      m.update(s)
      z[name] = (s - m.mean) / (m.std + NORM_EPS)
    kind_B = np.array([self.kinds.get(p, "") for p in prompt_texts])
    unsafe_B = 1.0 / (1.0 + np.exp(-z["harm"])) < self.threshold
    thresholded_B = ~np.isin(kind_B, GATED_KINDS)
    if self.rule == "llama2":
      thresholded_B |= kind_B == "helpful"
    use_harm_B = (kind_B == "red_team") | (thresholded_B & unsafe_B)
    self.last["harm_share"] = float(use_harm_B.mean())
    return np.where(use_harm_B, z["harm"], z["helpful"]).astype(np.float32)

  def raw(self, prompt_texts, tokens_BM, lengths_B) -> np.ndarray:
    """Each rollout's score by its kind's PM, unstandardised, touching no state (the
    probe's reward): the harmlessness PM's for red-team prompts and prompts of no known
    kind, the helpfulness PM's for helpful ones."""
    harm = np.asarray(self.harm(prompt_texts, tokens_BM, lengths_B), np.float32)
    helpful = np.asarray(self.helpful(prompt_texts, tokens_BM, lengths_B), np.float32)
    return np.where([self.kinds.get(p) == "helpful" for p in prompt_texts], helpful, harm)

  def state(self) -> dict[str, dict[str, float]]:
    return {name: dataclasses.asdict(m) for name, m in self.moments.items()}

  def load_state(self, state: Mapping[str, Mapping[str, float]]) -> None:
    self.moments |= {name: Moments.from_state(m) for name, m in state.items()
                     if name in self.moments}


class WeightedReward:
  """A `RewardFn` summing weighted (optionally normalised) sources.

  `state()` / `load_state()` carry the running moments through checkpoints (a
  source with its own, `GatedReward`, under "<name>/<its key>"); `last` holds the
  latest batch's raw mean of each source and what a source logs of its own, under
  "reward/<name>/<key>" (for the metrics)."""

  def __init__(self, sources: Sequence[tuple[str, float, RewardFn]], normalize: bool):
    if not sources:
      raise ValueError("reward.sources is empty; give at least one name=weight")
    self.sources, self.normalize = list(sources), normalize
    self.moments = {name: Moments() for name, _, _ in self.sources}
    self.last: dict[str, float] = {}

  def __call__(self, prompt_texts, tokens_BM, lengths_B) -> np.ndarray:
    total = None
    for name, weight, fn in self.sources:
      s = np.asarray(fn(prompt_texts, tokens_BM, lengths_B), np.float32)
      self.last[f"reward/{name}"] = float(s.mean())
      for key, value in getattr(fn, "last", {}).items():
        self.last[f"reward/{name}/{key}"] = value
      x = s.astype(np.float64)
      if self.normalize:
        m = self.moments[name]
        m.update(x)
        x = (x - m.mean) / (m.std + NORM_EPS)
      # Exact for one plain source of weight 1: float32 -> float64 * 1.0 -> float32.
      total = weight * x if total is None else total + weight * x
    return total.astype(np.float32)

  def raw(self, prompt_texts, tokens_BM, lengths_B) -> np.ndarray:
    """sum_i w_i * s_i without normalisation, touching no state: the reward of the fixed
    probe prompts (stage 7's `probe`), comparable across iterations, which the running
    moments are not (a stateful source gives its own `raw`)."""
    total = np.zeros(len(prompt_texts), np.float64)
    for _, weight, fn in self.sources:
      score = getattr(fn, "raw", fn)
      total += weight * np.asarray(score(prompt_texts, tokens_BM, lengths_B), np.float64)
    return total.astype(np.float32)

  @property
  def stateful(self) -> bool:
    """Whether `state()` holds anything a resumed run needs."""
    return self.normalize or any(hasattr(fn, "state") for _, _, fn in self.sources)

  def state(self) -> dict[str, dict[str, float]]:
    out = ({name: dataclasses.asdict(m) for name, m in self.moments.items()}
           if self.normalize else {})
    for name, _, fn in self.sources:
      if hasattr(fn, "state"):
        out |= {f"{name}/{key}": m for key, m in fn.state().items()}
    return out

  def load_state(self, state: Mapping[str, Mapping[str, float]]) -> None:
    fns = {name: fn for name, _, fn in self.sources}
    for name, m in state.items():
      source, _, key = name.partition("/")
      if key and hasattr(fns.get(source), "load_state"):
        fns[source].load_state({key: m})
      elif name in self.moments:
        self.moments[name] = Moments.from_state(m)
