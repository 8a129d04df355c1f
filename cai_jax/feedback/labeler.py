"""The AI labeler: response pairs in, soft preference labels (`LabelRecord`s) out.

Per pair, per feedback model, per principle (drawn per pair, seeded by the
pair id, or fixed):
  multiple_choice  ask "which response ..." with options (A)/(B), read the
                   log-probs of the two letters after "(", in one or both
                   presentation orders; optionally after chain-of-thought
                   reasoning sampled first (then clamped, see `labels`).
  pointwise        ask a Yes/No question about each response alone and
                   compare the two "good answer" log-odds.
Then: per principle a probability that a is better, their mean over
principles, then the mean or majority over feedback models. Stage 5 labels
pairs of helpful prompts under one helpfulness question instead of the
constitution's harmlessness principles (`helpfulness_constitution`,
`label_by_kind`), as the paper's helpfulness comparisons asked people which
answer was more helpful. The label math
is in `cai_jax.feedback.labels`; `model_label` applies it to the raw
log-probs a record stores, so labels can be re-derived from records.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from cai_jax.constitution import (HELPFUL_PRINCIPLE, Constitution, draw_comparison_principles,
                                  helpfulness_constitution, load_constitution)
from cai_jax.feedback import labels, prompts
from cai_jax.feedback.scoring import OptionScorer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder, sharder_from_config
from cai_jax.records import LabelRecord, ResponsePair
from cai_jax.sampling.chat import keys_for
from cai_jax.sampling.prefix import DEFAULT_MIN_SHARED_PREFIX
from cai_jax.sampling.sampler import DEFAULT_LENGTH_BUCKETS, Sampler, SamplingParams
from cai_jax.text.tokenizer import Tokenizer

MODES = ("multiple_choice", "pointwise")
# configs/ai_labels.py `helpful_labels`: how pairs of helpful prompts are labelled.
HELPFUL_LABELS = ("helpfulness", "constitution")


@dataclasses.dataclass(frozen=True)
class LabelerSettings:
  """How labels are asked for and combined (the `configs/ai_labels.py` fields)."""

  mode: str = "multiple_choice"
  num_principles: int = 1  # drawn per pair, without replacement
  principle_ids: tuple[str, ...] = ()  # fixed principles for every pair; () draws
  num_few_shot: int = 0
  order_swap: bool = True  # both presentation orders (multiple choice)
  order_combine: str = "logit"  # see labels.combine_orders
  chain_of_thought: bool = False
  cot_clamp: tuple[float, float] = (0.4, 0.6)
  cot_max_new_tokens: int = 96
  cot_temperature: float = 0.0  # 0: greedy reasoning
  pointwise_temperature: float = 1.0
  model_ensemble: str = "mean"  # or "majority"
  prompt_format: str = "plain"  # or "chat"
  max_response_tokens: int = 256  # each response cut to this many tokens; 0: no cut
  batch_size: int = 8
  length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
  # Leading tokens shared by a batch's prompts (few-shot examples) are prefilled once
  # when there are at least this many; 0: never.
  min_shared_prefix: int = DEFAULT_MIN_SHARED_PREFIX
  seed: int = 0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.order_combine not in labels.ORDER_COMBINES:
      raise ValueError(f"order_combine must be one of {labels.ORDER_COMBINES},"
                       f" got {self.order_combine!r}")
    if self.model_ensemble not in labels.MODEL_ENSEMBLES:
      raise ValueError(f"model_ensemble must be one of {labels.MODEL_ENSEMBLES},"
                       f" got {self.model_ensemble!r}")
    if self.prompt_format not in prompts.FORMATS:
      raise ValueError(f"prompt_format must be one of {prompts.FORMATS},"
                       f" got {self.prompt_format!r}")
    if not self.principle_ids and self.num_principles < 1:
      raise ValueError(f"num_principles must be >= 1, got {self.num_principles}")
    if self.mode == "pointwise" and self.chain_of_thought:
      raise ValueError("chain_of_thought applies to multiple_choice mode only")
    labels.clamp_margins(0.0, *self.cot_clamp)  # validates the range
    if self.min_shared_prefix < 0:
      raise ValueError(f"min_shared_prefix must be >= 0, got {self.min_shared_prefix}")

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> "LabelerSettings":
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in c.items() if k in fields}
    for k in ("principle_ids", "cot_clamp", "length_buckets"):
      if k in kwargs:
        kwargs[k] = tuple(kwargs[k])
    return cls(**kwargs)


@dataclasses.dataclass
class FeedbackModel:
  """One feedback model: its name (the load spec), weights and tokenizer."""

  name: str
  cfg: ModelConfig
  params: Any
  tok: Tokenizer
  sharder: Sharder | None = None

  @classmethod
  def load(cls, spec: str, sharder: Sharder | None = None, dtype: str = "float32",
           decode_layers: str = "unrolled"
           ) -> "FeedbackModel":
    from cai_jax.checkpoints.load import load_model
    cfg, params, tok = load_model(spec, sharder, dtype=dtype, decode_layers=decode_layers)
    logging.info("feedback model %s: %s, %.1fM params", spec, cfg.family,
                 cfg.num_params() / 1e6)
    return cls(spec, cfg, params, tok, sharder)


def model_label(logp_KS2: np.ndarray, *, mode: str, good_answers: Sequence[str] = (),
                order_combine: str = "logit", clamp: tuple[float, float] | None = None,
                pointwise_temperature: float = 1.0) -> float:
  """One feedback model's P(a preferred) from its raw log-probs [principle, slot, 2].

  multiple_choice: per principle, the per-order margins that a is preferred
  (`labels.a_margins`), clamped for chain of thought, combined over orders.
  pointwise: per principle sigmoid((good_a - good_b) / temperature), where
  good_x is response x's log-odds of the principle's good answer.
  Then the mean over principles.
  """
  logp_KS2 = np.asarray(logp_KS2, np.float64)
  if mode == "multiple_choice":
    margins_KS = labels.a_margins(logp_KS2)
    if clamp is not None:
      margins_KS = labels.clamp_margins(margins_KS, *clamp)
    p_K = labels.combine_orders(margins_KS, order_combine)
  elif mode == "pointwise":
    if len(good_answers) != logp_KS2.shape[0]:
      raise ValueError(f"{len(good_answers)} good answers for {logp_KS2.shape[0]} principles")
    good_KS = np.stack([labels.pointwise_good_score(logp_KS2[k, :, 0], logp_KS2[k, :, 1], g)
                        for k, g in enumerate(good_answers)])
    p_K = labels.pointwise_prob(good_KS[:, 0], good_KS[:, 1], pointwise_temperature)
  else:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  return float(labels.ensemble_principles(p_K))


def label_by_kind(labelers: dict[str, "Labeler"], pairs: Sequence[ResponsePair]
                  ) -> list[LabelRecord]:
  """Each pair labelled by `labelers[pair.kind]`, in the input order; pairs that share
  a labeler go through it in one call."""
  out: list[LabelRecord | None] = [None] * len(pairs)
  for labeler in {id(x): x for x in labelers.values()}.values():
    idx = [i for i, p in enumerate(pairs) if labelers[p.kind] is labeler]
    for i, rec in zip(idx, labeler.label([pairs[i] for i in idx]) if idx else []):
      out[i] = rec
  return out  # type: ignore[return-value]


class Labeler:
  """Labels `ResponsePair`s with one or more feedback models under a constitution."""

  def __init__(self, models: Sequence[FeedbackModel], constitution: Constitution,
               settings: LabelerSettings):
    if not models:
      raise ValueError("at least one feedback model is needed")
    self.models = list(models)
    self.constitution = constitution
    self.settings = s = settings
    self.pool = constitution
    if s.mode == "pointwise":
      usable = tuple(p for p in constitution.comparison if p.pointwise is not None)
      if not usable:
        raise ValueError(f"{constitution.source}: pointwise mode needs comparison principles"
                         " with a `pointwise` question; this constitution has none")
      self.pool = dataclasses.replace(constitution, comparison=usable)
    for pid in s.principle_ids:
      principle = constitution.comparison_principle(pid)  # KeyError names the file
      if s.mode == "pointwise" and principle.pointwise is None:
        raise ValueError(f"principle {pid!r} has no pointwise question")
    if not s.principle_ids and s.num_principles > len(self.pool.comparison):
      raise ValueError(f"num_principles={s.num_principles} but only"
                       f" {len(self.pool.comparison)} usable principles")
    self.examples = ()
    if s.mode == "multiple_choice":
      self.examples = prompts.few_shot_examples(constitution, s.num_few_shot,
                                                s.chain_of_thought)
    self.scorers = [OptionScorer(m.cfg, pad_id=m.tok.pad_id, batch_size=s.batch_size,
                                 sharder=m.sharder, length_buckets=s.length_buckets,
                                 min_shared_prefix=s.min_shared_prefix)
                    for m in self.models]
    self.samplers = [Sampler(m.cfg, max_new_tokens=s.cot_max_new_tokens,
                             stop_ids=m.cfg.eos_token_ids, pad_id=m.tok.pad_id,
                             sharder=m.sharder, length_buckets=s.length_buckets,
                             min_shared_prefix=s.min_shared_prefix)
                     if s.chain_of_thought else None for m in self.models]

  @classmethod
  def by_kind_from_config(cls, config: ml_collections.ConfigDict) -> dict[str, "Labeler"]:
    """Stage 5's labelers, prompt kind -> Labeler, sharing the config's feedback models
    (loaded once): the constitution's principles for red-team pairs, and for helpful
    pairs HELPFUL_PRINCIPLE (`helpful_labels="helpfulness"`) or the constitution too
    (`"constitution"`)."""
    specs = list(config.feedback_models)
    if not specs:
      raise ValueError("config.feedback_models is empty; give at least one load_model spec")
    settings = LabelerSettings.from_config(config)
    how = config.get("helpful_labels", "constitution")
    if how not in HELPFUL_LABELS:
      raise ValueError(f"config.helpful_labels={how!r}: use one of {HELPFUL_LABELS}")
    sharder = sharder_from_config(config)
    models = [FeedbackModel.load(spec, sharder, config.dtype, config.decode_layers)
              for spec in specs]
    base = load_constitution(config.constitution)
    harmless = cls(models, base, settings)
    if how == "constitution":
      return {"red_team": harmless, "helpful": harmless}
    return {"red_team": harmless, "helpful": cls(
        models, helpfulness_constitution(base, config.helpful_question, config.helpful_pointwise),
        dataclasses.replace(settings, principle_ids=(HELPFUL_PRINCIPLE,), num_few_shot=0))}

  @property
  def clamp(self) -> tuple[float, float] | None:
    return self.settings.cot_clamp if self.settings.chain_of_thought else None

  def principles_for(self, pair_id: str) -> list[str]:
    s = self.settings
    if s.principle_ids:
      return list(s.principle_ids)
    return draw_comparison_principles(self.pool, s.seed, pair_id, s.num_principles)

  def good_answers(self, principle_ids: Sequence[str]) -> list[str]:
    return [self.constitution.comparison_principle(p).pointwise.good_answer
            for p in principle_ids]

  def label(self, pairs: Sequence[ResponsePair]) -> list[LabelRecord]:
    s = self.settings
    principles = [self.principles_for(p.id) for p in pairs]
    logps, cots = [], []  # [model] -> [pair][principle][slot]...
    for model, scorer, sampler in zip(self.models, self.scorers, self.samplers):
      if s.mode == "multiple_choice":
        logp, cot = self._multiple_choice(model, scorer, sampler, pairs, principles)
      else:
        logp, cot = self._pointwise(model, scorer, pairs, principles), None
      logps.append(logp)
      cots.append(cot)
    out = []
    for i, pair in enumerate(pairs):
      good = self.good_answers(principles[i]) if s.mode == "pointwise" else ()
      per_model = [model_label(logps[m][i], mode=s.mode, good_answers=good,
                               order_combine=s.order_combine, clamp=self.clamp,
                               pointwise_temperature=s.pointwise_temperature)
                   for m in range(len(self.models))]
      out.append(LabelRecord(
          id=pair.id, prompt=pair.prompt, kind=pair.kind, response_a=pair.response_a,
          response_b=pair.response_b, mode=s.mode,
          models=tuple(m.name for m in self.models),
          principle_ids=tuple(principles[i]),
          logprobs=tuple(_nested_floats(logps[m][i]) for m in range(len(self.models))),
          cot=(tuple(tuple(tuple(c) for c in cots[m][i]) for m in range(len(self.models)))
               if s.chain_of_thought else ()),
          model_p_a=tuple(per_model),
          p_a=float(labels.ensemble_models(np.asarray(per_model), s.model_ensemble))))
    return out

  def response_scores(self, prompt_texts: Sequence[str], responses: Sequence[str],
                      principle_id: str) -> np.ndarray:
    """Each response alone under one principle's Yes/No question: the good answer's
    log-odds (higher = better, e.g. less harmful), mean over models. [N] float64."""
    question = self.constitution.comparison_principle(principle_id).pointwise
    if question is None:
      raise ValueError(f"principle {principle_id!r} has no pointwise question")
    s, per_model = self.settings, []
    for model, scorer in zip(self.models, self.scorers):
      texts = [prompts.pointwise_prompt(model.tok, question, p,
                                        prompts.truncate(model.tok, r, s.max_response_tokens),
                                        prompt_format=s.prompt_format)
               for p, r in zip(prompt_texts, responses, strict=True)]
      logp = self._score(model, scorer, texts, prompts.YES_NO_OPTIONS) if texts else (
          np.zeros((0, 2)))
      per_model.append(labels.pointwise_good_score(logp[:, 0], logp[:, 1],
                                                   question.good_answer))
    return np.mean(per_model, axis=0)

  # --- One model -------------------------------------------------------------------

  def _multiple_choice(self, model: FeedbackModel, scorer: OptionScorer,
                       sampler: Sampler | None, pairs: Sequence[ResponsePair],
                       principles: Sequence[Sequence[str]]):
    """Log-probs [pair][principle][order][A, B] and reasoning [pair][principle][order]."""
    s, tok = self.settings, model.tok
    orders = 2 if s.order_swap else 1
    jobs = []  # (pair index, principle index, order, question, prompt, first, second)
    for i, pair in enumerate(pairs):
      a = prompts.truncate(tok, pair.response_a, s.max_response_tokens)
      b = prompts.truncate(tok, pair.response_b, s.max_response_tokens)
      for k, pid in enumerate(principles[i]):
        question = self.constitution.comparison_principle(pid).question
        for o in range(orders):
          first, second = (a, b) if o == 0 else (b, a)
          jobs.append((i, k, o, question, pair.prompt, first, second))
    reasoning = [None] * len(jobs)
    if s.chain_of_thought:
      texts = [prompts.cot_prompt(tok, self.constitution, q, p, f, sec,
                                  examples=self.examples, prompt_format=s.prompt_format)
               for _, _, _, q, p, f, sec in jobs]
      names = [f"{pairs[i].id}/cot/{principles[i][k]}/{o}" for i, k, o, *_ in jobs]
      reasoning = self._generate(model, sampler, texts, names)
    texts = [prompts.multiple_choice_prompt(tok, self.constitution, q, p, f, sec,
                                            examples=self.examples,
                                            prompt_format=s.prompt_format, reasoning=r)
             for (_, _, _, q, p, f, sec), r in zip(jobs, reasoning)]
    logp = self._score(model, scorer, texts, prompts.LETTERS)
    logp_out = [[[None] * orders for _ in principles[i]] for i in range(len(pairs))]
    cot_out = [[[""] * orders for _ in principles[i]] for i in range(len(pairs))]
    for j, (i, k, o, *_) in enumerate(jobs):
      logp_out[i][k][o] = logp[j]
      if reasoning[j] is not None:
        cot_out[i][k][o] = reasoning[j]
    return [np.asarray(x) for x in logp_out], cot_out

  def _pointwise(self, model: FeedbackModel, scorer: OptionScorer,
                 pairs: Sequence[ResponsePair], principles: Sequence[Sequence[str]]):
    """Log-probs [pair][principle][response a, b][" Yes", " No"]."""
    s, tok = self.settings, model.tok
    texts = []
    for i, pair in enumerate(pairs):
      responses = [prompts.truncate(tok, r, s.max_response_tokens)
                   for r in (pair.response_a, pair.response_b)]
      for pid in principles[i]:
        question = self.constitution.comparison_principle(pid).pointwise
        texts += [prompts.pointwise_prompt(tok, question, pair.prompt, r,
                                           prompt_format=s.prompt_format) for r in responses]
    logp = self._score(model, scorer, texts, prompts.YES_NO_OPTIONS)
    out, j = [], 0
    for i in range(len(pairs)):
      n = 2 * len(principles[i])
      out.append(logp[j:j + n].reshape(len(principles[i]), 2, 2))
      j += n
    return out

  def _score(self, model: FeedbackModel, scorer: OptionScorer, texts: Sequence[str],
             options: Sequence[str]) -> np.ndarray:
    contexts, ids = [], []
    for text in texts:
      c, i = prompts.answer_context(model.tok, text, options)
      contexts.append(c)
      ids.append(i)
    return scorer(model.params, contexts, ids)

  def _generate(self, model: FeedbackModel, sampler: Sampler, texts: Sequence[str],
                names: Sequence[str]) -> list[str]:
    """Chain-of-thought reasoning, one seeded key per (pair, principle, order)."""
    s = self.settings
    room = model.cfg.max_seq_len - s.cot_max_new_tokens
    sampling = SamplingParams(temperature=s.cot_temperature)
    out = []
    for start in range(0, len(texts), s.batch_size):
      ids = []
      for text in texts[start:start + s.batch_size]:
        t = model.tok.encode(text)
        if len(t) > room:
          logging.warning("chain-of-thought prompt of %d tokens cut to its last %d", len(t), room)
          t = t[-room:]
        ids.append(t)
      chunk_names = names[start:start + s.batch_size]
      gen = sampler.generate(model.params, ids, keys_for(s.seed, chunk_names), sampling)
      for tokens, length in zip(gen.tokens, gen.lengths):
        text = model.tok.decode(tokens[:length], skip_special_tokens=True)
        out.append(prompts.clean_reasoning(text))
    return out


def _nested_floats(x: np.ndarray) -> tuple:
  if np.ndim(x) == 0:
    return float(x)
  return tuple(_nested_floats(v) for v in x)
