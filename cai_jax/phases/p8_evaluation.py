"""Stage 8: evaluate the initial, SL-CAI and RL-CAI models (the paper's Figs. 2, 4, 5).

1. answers   every model present answers the held-out red-team and helpfulness
             prompts (and a few stage-2 prompts, for the report's sample table),
             written as resumable shards `answers/<model>/shard-NNNNN.jsonl`
             (`evaluation.answers`). A model whose checkpoint does not exist
             yet is skipped with a note.
2. pairwise  every two models on every prompt: harmlessness on red-team
             prompts, helpfulness on helpful ones, judged (a) by the trained
             PM through the one scorer and (b) by a judge model that took no
             part in training (`evaluation.judges`). Win rates and
             Bradley-Terry Elo (`evaluation.elo`).
3. rounds    the PM's harmlessness score of stage 2's response after r
             revisions, r = 0..R (Fig. 5).
4. accuracy  feedback-model accuracy on PyRIT's human-scored harm pairs for
             each labeler setting (Fig. 4; `evaluation.labeler_accuracy`).

Everything goes to `<workdir>/p8_evaluation/results.json` (per-comparison
detail in `comparisons.jsonl`); then `cai_jax.evaluation.report` writes the report.

  python -m cai_jax.phases.p8_evaluation --config=configs/evaluation.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np

from cai_jax import assets, paths, records
from cai_jax.data import prompts
from cai_jax.evaluation import answers as ans
from cai_jax.evaluation import diagnosis, evidence, judges, refusal
from cai_jax.evaluation.labeler_accuracy import labeler_accuracy
from cai_jax.feedback import FeedbackModel
from cai_jax.model.sharding import sharder_from_config
from cai_jax.phases import cli, generation
from cai_jax.preference.scorer import Scorer



def model_specs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Model name -> load spec (a missing directory is detected by the caller)."""
  m = config.models
  specs = {"initial": m.initial, "sl_cai": m.sl_cai or paths.hf_export(workdir, paths.SFT),
           "rl_cai": m.rl_cai or paths.hf_export(workdir, paths.PPO)}
  # Stage 7's alternatives (DPO, RLOO, GRPO), where configured or trained.
  for name, stage in paths.RL_ALTERNATIVES.items():
    spec = m[name] or paths.hf_export(workdir, stage)
    if m[name] or os.path.isdir(spec):
      specs[name] = spec
  return specs


def used_in_training(config: ml_collections.ConfigDict, workdir: str) -> set[str]:
  """Model specs that shaped the policies: the initial model, stage 2's reviser and
  stage 5's feedback models."""
  used = {config.models.initial}
  p2_config = os.path.join(paths.stage_dir(workdir, paths.CRITIQUE_REVISION), "config.json")
  if os.path.exists(p2_config):
    with open(p2_config) as f:
      used.add(json.load(f).get("reviser") or config.models.initial)
  p5_config = os.path.join(paths.stage_dir(workdir, paths.AI_LABELS), "config.json")
  if os.path.exists(p5_config):
    with open(p5_config) as f:
      return used | set(json.load(f).get("feedback_models", ()))
  return used | set(assets.DEFAULT_FEEDBACK_MODELS)  # stage 5 has not run


def stage2_records(workdir: str) -> list[records.CritiqueRevisionRecord]:
  d = paths.stage_dir(workdir, paths.CRITIQUE_REVISION)
  if not records.completed_shards(d):
    return []
  return records.red_team_records(d)


def run_pm(config, workdir, sharder, answers, names, notes):
  """(PM comparisons per axis, revision-round scores, per-game rows, accuracy on human
  pairs, refusal preference by prompt set, reward per model and held-out prompt) from
  the stage-6 PM."""
  if not config.pm.enabled:
    return ({"missing": "disabled (pm.enabled=False)"}, {"missing": "disabled"}, [],
            {"missing": "disabled"}, {"missing": "disabled"}, {})
  try:
    scorer = Scorer.from_dir(paths.preference_model_dir("", workdir), sharder,
                             config.pm.batch_size)
  except FileNotFoundError as e:
    notes.append(f"preference model: {e}")
    return ({"missing": str(e)}, {"missing": str(e)}, [], {"missing": str(e)},
            {"missing": str(e)}, {})
  comparisons, rows, reward = judges.pm_comparisons(config, scorer, answers, names)
  human = (judges.pm_human_accuracy(scorer, config.pm.num_human_pairs, config.seed)
           if config.pm.num_human_pairs else {"missing": "disabled (pm.num_human_pairs=0)"})
  recs = [r for r in stage2_records(workdir) if r.rounds]
  recs = recs[:config.pm.num_revision_prompts] if config.pm.num_revision_prompts else recs
  rounds = (judges.revision_round_scores(recs, scorer.score_texts) if recs else
            {"missing": f"{paths.stage_dir(workdir, paths.CRITIQUE_REVISION)}: no red-team"
                        " records with revision rounds"})
  # The PM's own refusal preference on the policy PPO starts from (SL-CAI's answers).
  start = judges.rl_start_model(answers, names)
  refusals = ({"model": start, **judges.refusal_preference(scorer.score_texts, answers[start],
                                                          seed=config.seed)}
              if start else {"missing": "no model answered"})
  return comparisons, rounds, rows, human, refusals, reward


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Answers, comparisons, revision-round scores and labeler accuracy; returns results.json."""
  out = paths.stage_dir(workdir, paths.EVALUATION)
  os.makedirs(out, exist_ok=True)
  notes: list[str] = []
  sharder = sharder_from_config(config)
  held: list[prompts.PromptRecord] = []
  for path, n in zip(paths.require_prompts(workdir, "held_out"),
                     (config.num_red_team, config.num_helpful)):
    recs = prompts.read_jsonl(path)
    held += recs[:n] if n else recs
  borderline = prompts.load_source(config.borderline_source)
  borderline = borderline[:config.num_borderline] if config.num_borderline else borderline
  external = prompts.load_source(config.external_source) if config.external_source else []
  external = external[:config.num_external] if config.num_external else external
  samples = stage2_records(workdir)[:config.num_samples] if config.num_samples else []
  if config.num_samples and not samples:
    notes.append("sample table: no stage-2 records")
  rows = ([(p.id, p.prompt, p.kind, "held_out") for p in held]
          + [(p.id, p.prompt, p.kind, "borderline") for p in borderline]
          + [(p.id, p.prompt, p.kind, "external") for p in external]
          + [(r.id, r.prompt, r.kind, "sample") for r in samples])

  # --- 1. Answers ---
  models: dict[str, dict[str, Any]] = {}
  answers: dict[str, dict[str, ans.AnswerRecord]] = {}
  seconds: dict[str, float] = {}  # wall time per section, for sizing presets
  for name, spec in model_specs(config, workdir).items():
    if not ans.spec_exists(spec):
      note = f"{name}: {spec or '(no spec)'} does not exist yet; skipped"
      logging.warning(note)
      notes.append(note)
      models[name] = {"spec": spec, "status": "missing"}
      continue
    t0 = time.perf_counter()
    d = os.path.join(out, "answers", name)
    generation.run_generation(d, rows, config.shard_size, ans.answer_config(config, spec),
                              lambda: ans.Answerer(config, name, spec, sharder),
                              f"{name} answers")
    recs = records.read_records(d, ans.AnswerRecord)
    seconds[f"answers/{name}"] = time.perf_counter() - t0
    answers[name] = {r.id: r for r in recs}
    held_recs = [r for r in recs if r.split == "held_out"]
    models[name] = {"spec": spec, "status": "evaluated", "answers": len(recs),
                    "mean_answer_chars": float(np.mean([len(r.response) for r in held_recs]))
                    if held_recs else None}
  names = list(answers)

  # --- 2-4. Judges, revision rounds, labeler accuracy ---
  t0 = time.perf_counter()
  pm, rounds, pm_rows, pm_human, pm_refusals, pm_reward = run_pm(config, workdir, sharder,
                                                                 answers, names, notes)
  helpful_refusals = judges.helpful_pm_refusal_preference(config, workdir, sharder, answers,
                                                          names)
  gc.collect()  # the PMs' params, before the judge model loads
  seconds["pm"], t0 = time.perf_counter() - t0, time.perf_counter()
  spec, independent, why = judges.choose_judge(config, used_in_training(config, workdir))
  judge: dict[str, Any] = {"spec": spec, "independent": independent, "note": why,
                           "mode": config.judge.mode}
  judge_rows: list[dict] = []
  measures: dict[str, Any] = {
      "kinds": {r.id: (r.kind, r.split) for recs in answers.values() for r in recs.values()},
      "refusal": {n: {r.id: refusal.classify(r.prompt, r.response).category
                      for r in recs.values() if r.split != "sample"}
                  for n, recs in answers.items()},
      "pm_reward": pm_reward}
  judged: dict[str, Any] = {"judge_validation": {"missing": why}, "judge_rounds": {"missing": why}}
  if not spec:
    notes.append(f"judge: {why}")
    judge["missing"] = why
  else:
    if not independent:
      notes.append(f"judge {spec}: {why}")
    model = FeedbackModel.load(spec, sharder, config.dtype, config.decode_layers)
    judged = judges.judge_measures(config, model, answers, stage2_records(workdir))
    by_axis, judge_rows = judges.judge_comparisons(config, model, answers, names, judged)
    judge.update(by_axis)
    measures["judge_harm"] = judged.pop("judge_harm")
    measures["judge_helpful"] = judged.pop("judge_helpful")
    del model
  seconds["judge"], t0 = time.perf_counter() - t0, time.perf_counter()
  acc = labeler_accuracy(config, sharder, notes)
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
      "measures": measures, "pm_human": pm_human,
      "pm_refusal_preference": pm_refusals,
      "pm_helpful_refusal_preference": helpful_refusals, **judged,
      "refusal_validation": {s: refusal.accuracy(refusal.pyrit_rows(s))
                             for s in refusal.PYRIT_FILES},
      "elo": {"prior": config.elo.prior, "scale": config.elo.scale, "anchor": names[0]
              if names else None},
  }
  # The claims, and for each that fails the stage whose signal failed, measured.
  results["signals"] = diagnosis.measure(workdir, results)
  results["claims"] = diagnosis.explain(
      evidence.from_workdir(workdir, results, seed=config.seed, **config.evidence),
      results["signals"])
  path = paths.results_file(workdir)
  evidence.write(os.path.join(out, evidence.EVIDENCE_FILE), results["claims"])
  comparisons = paths.comparisons_file(workdir)
  with open(comparisons + ".tmp", "w") as f:
    for row in pm_rows + judge_rows:
      f.write(json.dumps(row) + "\n")
  os.replace(comparisons + ".tmp", comparisons)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  os.replace(path + ".tmp", path)
  for note in notes:
    logging.warning("evaluation: %s", note)
  if config.report:
    from cai_jax.evaluation import report
    logging.info("report: %s", report.write_report(workdir))
  return path


if __name__ == "__main__":
  cli.main(run, stage="evaluation")
