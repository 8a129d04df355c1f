"""Stage 8: evaluate the initial, SL-CAI and RL-CAI models (the paper's Figs. 2, 4, 5).

1. answers   every model present answers the held-out red-team and helpfulness
             prompts (and a few stage-2 prompts, for the report's sample table),
             written as resumable shards `answers/<model>/shard-NNNNN.jsonl`.
             Each sequence's key is named by the prompt, not the model, so the
             models are compared under common random numbers. A model whose
             checkpoint does not exist yet is skipped with a note.
2. pairwise  every two models on every prompt: harmlessness on red-team
             prompts, helpfulness on helpful ones, judged (a) by the trained
             PM (stage 6: P(i beats j) = sigma(r_i - r_j)) and (b) by a judge
             model that took no part in training (the stage-5 labeler library).
             Win rates and Bradley-Terry Elo (`fit_elo`).
3. rounds    the PM's harmlessness score of stage 2's response after r
             revisions, r = 0..R (Fig. 5).
4. accuracy  feedback-model accuracy on PyRIT's human-scored harm pairs for
             each labeler setting: alone, principle ensemble, order swap,
             chain of thought, pointwise (Fig. 4).

Everything goes to `<workdir>/p8_evaluation/results.json` (per-comparison
detail in `comparisons.jsonl`); then `cai_jax.report` writes the report.

  python -m cai_jax.phases.p8_evaluation --config=configs/evaluation.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from cai_jax import assets, prompts, records
from cai_jax.constitution import (ComparisonPrinciple, Constitution, PointwiseQuestion,
                                  load_constitution)
from cai_jax.feedback import FeedbackModel, Labeler, LabelerSettings, model_label
from cai_jax.phases import cli, common, p1_prompts, p2_critique_revision, p3_sft, p7_ppo
from cai_jax.sampling.chat import generate_chat

OUT = "p8_evaluation"
RESULTS = "results.json"
COMPARISONS = "comparisons.jsonl"
MODEL_NAMES = ("initial", "sl_cai", "rl_cai")
# (results key, prompt kind): which prompts each axis is measured on.
AXES = (("harmlessness", "red_team"), ("helpfulness", "helpful"))
HELPFUL_PRINCIPLE = "more_helpful"


def output_dir(workdir: str) -> str:
  return os.path.join(workdir, OUT)


def results_path(workdir: str) -> str:
  return os.path.join(output_dir(workdir), RESULTS)


@dataclasses.dataclass(frozen=True)
class AnswerRecord:
  """One model's answer to one prompt. split: "held_out" or "sample" (stage-2 prompt)."""

  id: str
  prompt: str
  kind: str
  split: str
  model: str
  response: str


# --- Win rates and Elo (pure) ------------------------------------------------------------


def win_rates(num_players: int, games: Sequence[tuple[int, int, float]]) -> np.ndarray:
  """[n, n] mean score of row i against column j (NaN where they never met).

  A game (i, j, p) gives i the score p and j the score 1 - p (p may be soft).
  """
  total = np.zeros((num_players, num_players))
  count = np.zeros((num_players, num_players))
  for i, j, p in games:
    total[i, j] += p
    total[j, i] += 1.0 - p
    count[i, j] += 1
    count[j, i] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def fit_elo(num_players: int, games: Sequence[tuple[int, int, float]], *, prior: float = 0.0,
            scale: float = 400.0, anchor: int = 0, max_iters: int = 100) -> np.ndarray:
  """Maximum-likelihood Bradley-Terry ratings in Elo points, `anchor` at 0.

  Maximises sum_g [p log sigma(s_i - s_j) + (1 - p) log sigma(s_j - s_i)]
  - prior/2 |s|^2 over the log-strengths s (s_anchor = 0) by Newton's method
  with backtracking (the objective is concave, so this is deterministic and
  exact), then returns s * scale / ln 10: a 400-point gap means 10:1 odds.
  A perfect record has no finite MLE; `prior` > 0 keeps it finite.
  """
  if not 0 <= anchor < num_players:
    raise ValueError(f"anchor {anchor} outside {num_players} players")
  free = [k for k in range(num_players) if k != anchor]
  g_i = np.asarray([g[0] for g in games], int)
  g_j = np.asarray([g[1] for g in games], int)
  g_p = np.asarray([g[2] for g in games], float)
  if np.any((g_p < 0) | (g_p > 1)):
    raise ValueError("game scores must lie in [0, 1]")

  def objective(s: np.ndarray) -> float:
    d = s[g_i] - s[g_j]
    return float(-(g_p * np.logaddexp(0, -d) + (1 - g_p) * np.logaddexp(0, d)).sum()
                 - 0.5 * prior * (s ** 2).sum())

  s = np.zeros(num_players)
  for _ in range(max_iters):
    d = s[g_i] - s[g_j]
    q = 0.5 * (1 + np.tanh(0.5 * d))  # sigma(d)
    resid, w = g_p - q, q * (1 - q)
    grad = np.zeros(num_players)
    np.add.at(grad, g_i, resid)
    np.add.at(grad, g_j, -resid)
    grad -= prior * s
    hess = np.zeros((num_players, num_players))
    np.add.at(hess, (g_i, g_i), -w)
    np.add.at(hess, (g_j, g_j), -w)
    np.add.at(hess, (g_i, g_j), w)
    np.add.at(hess, (g_j, g_i), w)
    hess -= prior * np.eye(num_players)
    sub = hess[np.ix_(free, free)]
    step = np.zeros(num_players)
    step[free] = np.linalg.lstsq(-sub, grad[free], rcond=None)[0]
    t, before = 1.0, objective(s)
    while objective(s + t * step) < before - 1e-12 and t > 1e-8:
      t *= 0.5
    s = s + t * step
    if np.max(np.abs(t * step)) < 1e-10:
      break
  return s * scale / math.log(10.0)


def pairwise_summary(names: Sequence[str], games: Sequence[tuple[int, int, float]],
                     prior: float, scale: float) -> dict[str, Any]:
  """Win-rate table, overall win rate and Elo (first model = 0) of one axis and judge."""
  n = len(names)
  wr = win_rates(n, games)
  elo = fit_elo(n, games, prior=prior, scale=scale) if games else np.zeros(n)
  overall = {}
  for k, name in enumerate(names):
    mine = [p if i == k else 1 - p for i, j, p in games if k in (i, j)]
    overall[name] = float(np.mean(mine)) if mine else None
  return {
      "num_games": len(games),
      "win_rate": {a: {b: (None if not np.isfinite(wr[x, y]) else float(wr[x, y]))
                       for y, b in enumerate(names) if y != x} for x, a in enumerate(names)},
      "overall_win_rate": overall,
      "elo": {name: float(e) for name, e in zip(names, elo)},
  }


# --- Labeler accuracy math (pure) --------------------------------------------------------


def accuracy(p_a: np.ndarray, a_better: np.ndarray) -> float:
  """Fraction of pairs whose label prefers the better response; p = 1/2 counts half."""
  p_a, a_better = np.asarray(p_a, float), np.asarray(a_better, float)
  right = np.where(p_a == 0.5, 0.5, ((p_a > 0.5) == (a_better > 0.5)).astype(float))
  return float(right.mean())


def reliability(p_a: np.ndarray, a_better: np.ndarray, num_bins: int
                ) -> tuple[float, list[dict[str, Any]]]:
  """(ECE, bins of count / mean predicted / observed frequency), empty bins left out."""
  from cai_jax.phases.p6_preference_model import calibration
  ece, table = calibration(np.asarray(p_a, float), np.asarray(a_better, float), num_bins)
  return ece, [row for row in table if row["count"]]


# Rows derived from one labelling run's raw log-probs: (row name, run, principles, orders,
# clamp). "alone" = one principle, one presentation order.
ACCURACY_ROWS = {
    "multiple_choice": [("alone", 1, 1, False), ("principle ensemble", 0, 1, False),
                        ("order swap", 1, 2, False), ("ensemble + order swap", 0, 2, False)],
    "chain_of_thought": [("chain of thought (unclamped)", 1, 2, False),
                         ("chain of thought (clamped)", 1, 2, True)],
    "pointwise": [("pointwise alone", 1, 2, False), ("pointwise ensemble", 0, 2, False)],
}


def derived_label(logp_KS2: np.ndarray, *, mode: str, good_answers: Sequence[str],
                  principles: int, orders: int, clamp: tuple[float, float] | None,
                  order_combine: str = "logit") -> float:
  """A row's label from a record's log-probs: its first principles and orders only.

  principles = 0 means all of them. Pointwise "orders" are the two responses,
  which every pointwise label needs.
  """
  k = principles or logp_KS2.shape[0]
  return model_label(np.asarray(logp_KS2)[:k, :orders], mode=mode,
                     good_answers=list(good_answers)[:k], order_combine=order_combine,
                     clamp=clamp)


# --- Answers -------------------------------------------------------------------------------


def model_specs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Model name -> load spec (a missing directory is detected by the caller)."""
  m = config.models
  return {"initial": m.initial,
          "sl_cai": m.sl_cai or os.path.join(p3_sft.output_dir(workdir), "hf"),
          "rl_cai": m.rl_cai or os.path.join(p7_ppo.output_dir(workdir), "hf")}


def spec_exists(spec: str) -> bool:
  """A directory / file that exists, a bundled asset that is installed, or a hub id."""
  if not spec:
    return False
  if os.path.sep in spec or spec.startswith("."):
    return os.path.exists(spec)
  if spec in assets.ASSETS:
    return assets.is_available(spec)
  return True  # "random:<preset>" or a hub id: load_model decides


def fingerprint(spec: str) -> str:
  """Changes when a model directory is rewritten, so stale answers are refused."""
  if not os.path.isdir(spec):
    return spec
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(spec)):
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      h.update(f"{os.path.relpath(os.path.join(root, name), spec)}:{st.st_size}:"
               f"{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def eval_prompts(config: ml_collections.ConfigDict, workdir: str
                 ) -> list[prompts.PromptRecord]:
  """Held-out red-team and helpful prompts: the first N of each kind."""
  out: list[prompts.PromptRecord] = []
  for kind, n in (("red_team", config.num_red_team), ("helpful", config.num_helpful)):
    path = p1_prompts.output_path(workdir, kind, "held_out")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: missing; run stage 1 first"
                              " (python -m cai_jax.phases.p1_prompts ...)")
    recs = prompts.read_jsonl(path)
    out += recs[:n] if n else recs
  return out


def sample_records(config: ml_collections.ConfigDict, workdir: str
                   ) -> list[records.CritiqueRevisionRecord]:
  """The first `num_samples` stage-2 red-team records (empty without stage 2)."""
  d = p2_critique_revision.output_dir(workdir)
  if not config.num_samples or not records.completed_shards(d):
    return []
  recs = records.read_records(d, records.CritiqueRevisionRecord)
  return [r for r in recs if r.kind == "red_team"][:config.num_samples]


class Answerer:
  """One model answering chunks of (id, prompt, kind, split) rows."""

  def __init__(self, config: ml_collections.ConfigDict, name: str, spec: str, sharder):
    self.config, self.name = config, name
    self.cfg, self.params, self.tok = common.load_for_sampling(spec, sharder, config.dtype,
                                                               config.decode_layers)
    self.sampler = common.make_sampler(self.cfg, self.tok, sharder, config.max_new_tokens)
    self.sampling = common.sampling_from_config(config.sampling)

  def __call__(self, chunk: Sequence[tuple[str, str, str, str]]) -> list[AnswerRecord]:
    texts = generate_chat(self.sampler, self.params, self.tok,
                          [[{"role": "user", "content": p}] for _, p, _, _ in chunk],
                          seed=self.config.seed, names=[f"{i}/answer" for i, *_ in chunk],
                          sampling=self.sampling,
                          max_prompt_tokens=self.config.max_prompt_tokens)
    return [AnswerRecord(i, p, k, s, self.name, t) for (i, p, k, s), t in zip(chunk, texts)]


def answer_config(config: ml_collections.ConfigDict, spec: str) -> ml_collections.ConfigDict:
  """What an answers directory depends on (refuses to resume under anything else)."""
  return ml_collections.ConfigDict({
      "spec": spec, "fingerprint": fingerprint(spec), "seed": config.seed,
      "dtype": config.dtype, "max_new_tokens": config.max_new_tokens,
      "max_prompt_tokens": config.max_prompt_tokens, "sampling": dict(config.sampling)})


def generate_answers(config: ml_collections.ConfigDict, workdir: str, name: str, spec: str,
                     rows: Sequence[tuple[str, str, str, str]], sharder
                     ) -> list[AnswerRecord]:
  d = os.path.join(output_dir(workdir), "answers", name)
  records.check_same_config(d, answer_config(config, spec))
  num_shards = -(-len(rows) // config.shard_size)
  if not set(range(num_shards)) <= records.completed_shards(d):
    answerer = Answerer(config, name, spec, sharder)
    records.run_sharded(d, rows, config.shard_size, answerer,
                        on_shard=lambda i, n: logging.info("%s answers: shard %d/%d", name,
                                                           i + 1, n))
    del answerer
  return records.read_records(d, AnswerRecord)


# --- Judges --------------------------------------------------------------------------------


def used_in_training(config: ml_collections.ConfigDict, workdir: str) -> set[str]:
  """Model specs that shaped the policies: the initial model and stage 5's feedback models."""
  used = {config.models.initial}
  p5_config = os.path.join(workdir, "p5_ai_labels", "config.json")
  if os.path.exists(p5_config):
    with open(p5_config) as f:
      used |= set(json.load(f).get("feedback_models", ()))
  else:
    from configs import ai_labels  # the stage-5 default, when stage 5 has not run
    used |= set(ai_labels.DEFAULT_FEEDBACK_MODELS)
  return used


def choose_judge(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, bool, str]:
  """(spec, independent, note): the configured judge, or the first independent candidate."""
  used = used_in_training(config, workdir)
  if config.judge.model:
    independent = config.judge.model not in used
    return config.judge.model, independent, (
        "configured" + ("" if independent else "; it also took part in training,"
                        " so it is NOT an independent judge"))
  available = [c for c in config.judge.candidates if spec_exists(c)]
  for c in available:
    if c not in used:
      return c, True, f"first bundled model not used in training (used: {sorted(used)})"
  if available:
    return available[0], False, (f"every installed candidate took part in training"
                                 f" ({sorted(used)}): {available[0]} is NOT independent")
  return "", False, f"none of {list(config.judge.candidates)} is installed"


def helpful_constitution(base: Constitution, config: ml_collections.ConfigDict
                         ) -> Constitution:
  """The base constitution with one helpfulness comparison principle, no few-shot."""
  principle = ComparisonPrinciple(HELPFUL_PRINCIPLE, config.judge.helpful_question,
                                  PointwiseQuestion(config.judge.helpful_pointwise, "Yes"))
  return dataclasses.replace(base, comparison=(principle,), comparison_few_shot=())


def judge_labelers(model: FeedbackModel, config: ml_collections.ConfigDict
                   ) -> dict[str, Labeler]:
  """Prompt kind -> labeler: harmlessness principles on red-team, helpfulness on helpful."""
  j = config.judge
  base = load_constitution(config.constitution)
  common_kw = dict(mode=j.mode, order_swap=j.order_swap, prompt_format=j.prompt_format,
                   max_response_tokens=j.max_response_tokens, batch_size=j.batch_size,
                   seed=config.seed)
  return {
      "red_team": Labeler([model], base, LabelerSettings(
          principle_ids=tuple(j.harmless_principles), **common_kw)),
      "helpful": Labeler([model], helpful_constitution(base, config), LabelerSettings(
          principle_ids=(HELPFUL_PRINCIPLE,), **common_kw)),
  }


def match_ups(answers: dict[str, dict[str, AnswerRecord]], kind: str
              ) -> list[tuple[int, int, str]]:
  """(model index i < j, prompt id) for every held-out prompt of `kind` both answered."""
  names = list(answers)
  out = []
  for x in range(len(names)):
    for y in range(x + 1, len(names)):
      common_ids = sorted(i for i, r in answers[names[x]].items()
                          if r.kind == kind and r.split == "held_out" and i in answers[names[y]])
      out += [(x, y, i) for i in common_ids]
  return out


# --- The run -------------------------------------------------------------------------------


def _release(*objs) -> None:
  """Drop device buffers of a model we are done with (one model resident at a time)."""
  import gc
  del objs
  gc.collect()


def run_pm(config, workdir, sharder, answers, names, notes) -> tuple[dict, dict, list[dict]]:
  """(PM comparisons per axis, revision-round scores, per-game rows) from the stage-6 PM."""
  from cai_jax.phases import p6_preference_model as p6
  if not config.pm.enabled:
    return {"missing": "disabled (pm.enabled=False)"}, {"missing": "disabled"}, []
  try:
    cfg, params, tok = p6.restore_preference_model(workdir, sharder)
  except FileNotFoundError as e:
    notes.append(f"preference model: {e}")
    return {"missing": str(e)}, {"missing": str(e)}, []
  info_path = os.path.join(p6.output_dir(workdir), p6.MODEL_DIR, "pm.json")
  with open(info_path) as f:
    seq_len = json.load(f).get("seq_len")

  def score(prompt_texts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    if not prompt_texts:
      return np.zeros(0, np.float32)
    return p6.score(params, cfg, tok, prompt_texts, responses,
                    batch_size=config.pm.batch_size, seq_len=seq_len)

  rows: list[dict] = []
  comparisons: dict[str, Any] = {}
  reward = {name: {} for name in names}
  for name in names:
    recs = [r for r in answers[name].values() if r.split == "held_out"]
    for r, s in zip(recs, score([r.prompt for r in recs], [r.response for r in recs])):
      reward[name][r.id] = float(s)
  for axis, kind in AXES:
    games = []
    for x, y, pid in match_ups(answers, kind):
      d = reward[names[x]][pid] - reward[names[y]][pid]
      p = 0.5 * (1 + math.tanh(0.5 * d))
      games.append((x, y, p))
      rows.append({"judge": "pm", "axis": axis, "id": pid, "a": names[x], "b": names[y],
                   "reward_a": reward[names[x]][pid], "reward_b": reward[names[y]][pid],
                   "p_a": p})
    comparisons[axis] = pairwise_summary(names, games, config.elo.prior, config.elo.scale)
    comparisons[axis]["mean_reward"] = {
        n: float(np.mean([v for pid, v in reward[n].items() if answers[n][pid].kind == kind]))
        if any(answers[n][pid].kind == kind for pid in reward[n]) else None for n in names}
  rounds = revision_round_scores(config, workdir, score)
  _release(params)
  return comparisons, rounds, rows


def revision_round_scores(config, workdir: str,
                          score: Callable[[Sequence[str], Sequence[str]], np.ndarray]
                          ) -> dict[str, Any]:
  """PM score of stage 2's response after r revisions, r = 0..R (mean, std error, n)."""
  d = p2_critique_revision.output_dir(workdir)
  if not records.completed_shards(d):
    return {"missing": f"{d}: no stage-2 records"}
  recs = [r for r in records.read_records(d, records.CritiqueRevisionRecord)
          if r.kind == "red_team" and r.rounds]
  recs = recs[:config.pm.num_revision_prompts] if config.pm.num_revision_prompts else recs
  if not recs:
    return {"missing": f"{d}: no red-team records with revision rounds"}
  num_rounds = min(len(r.rounds) for r in recs)
  means, stderrs = [], []
  per_round = []
  for k in range(num_rounds + 1):
    s = score([r.prompt for r in recs], [r.response_at(k) for r in recs])
    per_round.append(s)
    means.append(float(s.mean()))
    stderrs.append(float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else 0.0)
  return {"rounds": list(range(num_rounds + 1)), "mean": means, "stderr": stderrs,
          "count": len(recs), "mode": recs[0].mode,
          "improved_fraction": float(np.mean(per_round[-1] > per_round[0]))}


def run_judge(config, workdir, sharder, answers, names, notes) -> tuple[dict, list[dict]]:
  """Judge-model comparisons per axis, and the per-game rows."""
  spec, independent, why = choose_judge(config, workdir)
  info: dict[str, Any] = {"spec": spec, "independent": independent, "note": why,
                          "mode": config.judge.mode}
  if not spec:
    notes.append(f"judge: {why}")
    return {"missing": why, **info}, []
  if not independent:
    notes.append(f"judge {spec}: {why}")
  model = FeedbackModel.load(spec, sharder, config.dtype, config.decode_layers)
  labelers = judge_labelers(model, config)
  rows: list[dict] = []
  out: dict[str, Any] = dict(info)
  for axis, kind in AXES:
    ups = match_ups(answers, kind)
    pairs = [records.ResponsePair(f"{pid}/{names[x]}-vs-{names[y]}", answers[names[x]][pid].prompt,
                                  kind, answers[names[x]][pid].response,
                                  answers[names[y]][pid].response) for x, y, pid in ups]
    labels = labelers[kind].label(pairs) if pairs else []
    games = [(x, y, float(rec.p_a)) for (x, y, _), rec in zip(ups, labels)]
    rows += [{"judge": "judge", "axis": axis, "id": pid, "a": names[x], "b": names[y],
              "p_a": p} for (x, y, pid), (_, _, p) in zip(ups, games)]
    out[axis] = pairwise_summary(names, games, config.elo.prior, config.elo.scale)
  _release(model, labelers)
  return out, rows


def run_accuracy(config, sharder, notes) -> dict[str, Any]:
  """Feedback-model accuracy and calibration per labeler setting on PyRIT's pairs."""
  a = config.accuracy
  if not a.enabled:
    return {"missing": "disabled (accuracy.enabled=False)"}
  if not a.models:
    return {"missing": "no feedback models configured (accuracy.models)"}
  from cai_jax.feedback.eval_data import pyrit_pairs
  try:
    pairs, a_better = pyrit_pairs(a.num_pairs or None, seed=config.seed)
  except FileNotFoundError as e:
    notes.append(f"labeler accuracy: {e}")
    return {"missing": str(e)}
  constitution = load_constitution(config.constitution)
  principles = tuple(a.principles)
  settings = {
      "multiple_choice": dict(principle_ids=principles, num_few_shot=a.num_few_shot),
      "chain_of_thought": dict(principle_ids=principles[:1], num_few_shot=a.num_few_shot,
                               chain_of_thought=True, cot_max_new_tokens=a.cot_max_new_tokens),
      "pointwise": dict(mode="pointwise", principle_ids=principles),
  }
  unknown = set(a.runs) - set(settings)
  if unknown:
    raise ValueError(f"accuracy.runs: unknown {sorted(unknown)}; choose from {sorted(settings)}")
  out: dict[str, Any] = {"num_pairs": len(pairs), "frac_a_better": float(a_better.mean()),
                         "principles": list(principles), "models": {}}
  for spec in a.models:
    if not spec_exists(spec):
      notes.append(f"labeler accuracy: {spec} is not installed; skipped")
      continue
    model = FeedbackModel.load(spec, sharder, config.dtype, config.decode_layers)
    rows = []
    for run_name in a.runs:
      s = LabelerSettings(max_response_tokens=a.max_response_tokens, batch_size=a.batch_size,
                          seed=config.seed, **settings[run_name])
      labeler = Labeler([model], constitution, s)
      recs = labeler.label(pairs)
      for row, k, orders, clamped in ACCURACY_ROWS[run_name]:
        clamp = s.cot_clamp if clamped else None
        p = np.asarray([derived_label(
            np.asarray(r.logprobs[0]), mode=s.mode,
            good_answers=labeler.good_answers(r.principle_ids) if s.mode == "pointwise" else (),
            principles=k, orders=orders, clamp=clamp, order_combine=s.order_combine)
            for r in recs])
        ece, table = reliability(p, a_better, a.num_bins)
        rows.append({"setting": row, "run": run_name, "principles": k or len(principles),
                     "orders": orders, "clamp": list(clamp) if clamp else None,
                     "accuracy": accuracy(p, a_better), "ece": ece,
                     "brier": float(np.mean((p - a_better) ** 2)), "reliability": table})
    params_m = model.cfg.num_params() / 1e6
    out["models"][spec] = {"params_millions": float(params_m), "rows": rows}
    _release(model)
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Answers, comparisons, revision-round scores and labeler accuracy; returns results.json."""
  out = output_dir(workdir)
  os.makedirs(out, exist_ok=True)
  notes: list[str] = []
  sharder = common.sharder_from_config(config)
  held = eval_prompts(config, workdir)
  samples = sample_records(config, workdir)
  if config.num_samples and not samples:
    notes.append("sample table: no stage-2 records")
  rows = ([(p.id, p.prompt, p.kind, "held_out") for p in held]
          + [(r.id, r.prompt, r.kind, "sample") for r in samples])

  models: dict[str, dict[str, Any]] = {}
  answers: dict[str, dict[str, AnswerRecord]] = {}
  seconds: dict[str, float] = {}  # wall time per section, for sizing presets
  for name, spec in model_specs(config, workdir).items():
    if not spec_exists(spec):
      note = f"{name}: {spec or '(no spec)'} does not exist yet; skipped"
      logging.warning(note)
      notes.append(note)
      models[name] = {"spec": spec, "status": "missing"}
      continue
    t0 = time.perf_counter()
    recs = generate_answers(config, workdir, name, spec, rows, sharder)
    seconds[f"answers/{name}"] = time.perf_counter() - t0
    answers[name] = {r.id: r for r in recs}
    held_recs = [r for r in recs if r.split == "held_out"]
    models[name] = {"spec": spec, "status": "evaluated", "answers": len(recs),
                    "mean_answer_chars": float(np.mean([len(r.response) for r in held_recs]))
                    if held_recs else None}
  names = list(answers)

  t0 = time.perf_counter()
  pm, rounds, pm_rows = run_pm(config, workdir, sharder, answers, names, notes)
  seconds["pm"], t0 = time.perf_counter() - t0, time.perf_counter()
  judge, judge_rows = run_judge(config, workdir, sharder, answers, names, notes)
  seconds["judge"], t0 = time.perf_counter() - t0, time.perf_counter()
  acc = run_accuracy(config, sharder, notes)
  seconds["labeler_accuracy"] = time.perf_counter() - t0

  sample_table = [{"id": r.id, "prompt": r.prompt, "initial": r.initial_response,
                   "revised": r.response_at(-1), "rounds": len(r.rounds),
                   "answers": {n: answers[n][r.id].response for n in names if r.id in answers[n]}}
                  for r in samples]
  results = {
      "models": models, "evaluated_models": names,
      "prompts": {k: sum(p.kind == k for p in held) for k in ("red_team", "helpful")},
      "num_samples": len(samples),
      "pm": pm, "judge": judge, "revision_rounds": rounds, "labeler_accuracy": acc,
      "samples": sample_table, "notes": notes, "seconds": seconds,
      "elo": {"prior": config.elo.prior, "scale": config.elo.scale, "anchor": names[0]
              if names else None},
  }
  path = results_path(workdir)
  with open(os.path.join(out, COMPARISONS + ".tmp"), "w") as f:
    for row in pm_rows + judge_rows:
      f.write(json.dumps(row) + "\n")
  os.replace(os.path.join(out, COMPARISONS + ".tmp"), os.path.join(out, COMPARISONS))
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  os.replace(path + ".tmp", path)
  for note in notes:
    logging.warning("evaluation: %s", note)
  if config.report:
    from cai_jax import report
    logging.info("report: %s", report.write_report(workdir))
  return path


if __name__ == "__main__":
  cli.main(run)
