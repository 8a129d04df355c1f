"""Where every stage writes, what each stage reads, and the one rule for which
model is SL-CAI. The only module that knows the workdir's layout: phases,
the pipeline, the evaluation and its report ask it instead of importing each
other. It sits below all of them and imports nothing from `cai_jax.phases`.

  <workdir>/p1_prompts/{red_team,helpful}_{train,held_out}.jsonl
  <workdir>/p2_critique_revision/shard-NNNNN.jsonl
  <workdir>/p3_sft/{checkpoints,hf,...}
  <workdir>/p4_pairs/shard-NNNNN.jsonl
  <workdir>/p5_ai_labels/shard-NNNNN.jsonl
  <workdir>/p6_preference_model/{checkpoints,model,calibration,...}
  <workdir>/p7_ppo/{checkpoints,hf,...}          (p7_rloo/, p7_grpo/: the critic-free
                                                 algorithms of the same stage)
  <workdir>/p7_dpo/{checkpoints,reference_logps.npz,hf,...}
  <workdir>/p8_evaluation/{results.json,comparisons.jsonl,answers/}
  <workdir>/report/report.md
"""

from __future__ import annotations

import json
import os

from cai_jax import records

PROMPTS = "p1_prompts"
CRITIQUE_REVISION = "p2_critique_revision"
SFT = "p3_sft"
PAIRS = "p4_pairs"
AI_LABELS = "p5_ai_labels"
PREFERENCE_MODEL = "p6_preference_model"
PPO = "p7_ppo"
RLOO = "p7_rloo"  # stage 7 with algorithm="rloo"
GRPO = "p7_grpo"  # stage 7 with algorithm="grpo"
DPO = "p7_dpo"  # the alternative RL-CAI stage: DPO on stage 5's soft labels
# Stage 7's alternatives to PPO, by the name stage 8 and the report give their model.
RL_ALTERNATIVES = {"rloo": RLOO, "grpo": GRPO, "dpo": DPO}  # pipeline order
EVALUATION = "p8_evaluation"
REPORT = "report"
PROMPT_KINDS = ("red_team", "helpful")

# The command that writes each stage's outputs, for "run stage N first" errors.
_STAGE = {PROMPTS: 1, CRITIQUE_REVISION: 2, SFT: 3, PAIRS: 4, AI_LABELS: 5,
          PREFERENCE_MODEL: 6, PPO: 7, RLOO: 7, GRPO: 7, DPO: 7, EVALUATION: 8}
_MODULE = {RLOO: "p7_ppo --config.algorithm=rloo", GRPO: "p7_ppo --config.algorithm=grpo"}


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def run_first(stage: str) -> str:
  """The fix that ends a "missing input" error: the command for `stage`."""
  return (f"run stage {_STAGE[stage]} first (python -m cai_jax.phases."
          f"{_MODULE.get(stage, stage)} ...)")


def rl_stage(algorithm: str) -> str:
  """Stage 7's output directory for an on-policy algorithm ("ppo", "rloo", "grpo")."""
  return {"ppo": PPO, "rloo": RLOO, "grpo": GRPO}[algorithm]


def prompts_file(workdir: str, kind: str, split: str) -> str:
  return os.path.join(workdir, PROMPTS, f"{kind}_{split}.jsonl")


def hf_export(workdir: str, stage: str) -> str:
  """The final model of a training stage (SFT, PPO) as a Hugging Face directory."""
  return os.path.join(workdir, stage, "hf")


def results_file(workdir: str) -> str:
  return os.path.join(workdir, EVALUATION, "results.json")


def comparisons_file(workdir: str) -> str:
  """Stage 8's per-game rows (PM and judge), one JSON object a line."""
  return os.path.join(workdir, EVALUATION, "comparisons.jsonl")


def pipeline_config(workdir: str) -> str:
  """Each stage's config as `cai_jax.pipeline` last ran it (stage name -> dict)."""
  return os.path.join(workdir, "pipeline_config.json")


# Stages whose outputs keep their own config.json (the generation stages), read when
# the stages were run one by one instead of by cai_jax.pipeline.
STAGE_CONFIG_DIRS = {"critique_revision": CRITIQUE_REVISION, "pairs": PAIRS,
                     "ai_labels": AI_LABELS}


def stage_configs(workdir: str) -> tuple[dict[str, dict], str]:
  """(stage name -> its config as last run, where they were read from): the pipeline's
  `pipeline_config.json`, else each generation stage's own `config.json`."""
  path = pipeline_config(workdir)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f), f"`{path}`"
  found = {}
  for stage, d in STAGE_CONFIG_DIRS.items():
    p = os.path.join(stage_dir(workdir, d), "config.json")
    if os.path.exists(p):
      with open(p) as f:
        found[stage] = json.load(f)
  return found, ("each generation stage's `config.json` (no pipeline_config.json: the stages"
                 " ran one by one)")


# Stage 7's fixed probe: the policy's reward on the same held-out prompts, by iteration.
PROBE_FILE = "probe.jsonl"


def probe_file(workdir: str, stage: str) -> str:
  return os.path.join(stage_dir(workdir, stage), PROBE_FILE)


# Stage 6 with pms="by_kind": the helpfulness PM's directory inside the stage's, beside
# the harmlessness PM that is the stage's own (what `reward_model` reads by default).
HELPFUL_PM = "helpful"


def pm_out(workdir: str, which: str = "") -> str:
  """Stage 6's output for one PM: "" the stage's PM, HELPFUL_PM the helpfulness one."""
  out = stage_dir(workdir, PREFERENCE_MODEL)
  return os.path.join(out, which) if which else out


def calibration_dir(workdir: str, which: str = "") -> str:
  return os.path.join(pm_out(workdir, which), "calibration")


# --- Inputs a stage needs, with the error that says which stage to run -----------------------


def require_prompts(workdir: str, split: str, kinds=PROMPT_KINDS) -> list[str]:
  """Stage 1's files of `kinds` for `split`, each checked to exist."""
  paths = [prompts_file(workdir, kind, split) for kind in kinds]
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: missing; {run_first(PROMPTS)}")
  return paths


def require_records(directory: str, stage: str, what: str, override: str = "") -> str:
  """`directory` when it holds completed shards, else an error naming the stage to run."""
  if not os.path.isdir(directory) or not records.completed_shards(directory):
    hint = f" or set --config.{override}" if override else ""
    raise FileNotFoundError(f"{directory}: no {what}; {run_first(stage)}{hint}")
  return directory


def ai_labels_dir(configured: str, workdir: str, required: bool) -> str | None:
  """Stage 5's records (the configured directory, else the workdir's), or None
  when there are none and they are not `required`."""
  directory = configured or stage_dir(workdir, AI_LABELS)
  if os.path.isdir(directory) and records.completed_shards(directory):
    return directory
  if required:
    require_records(directory, AI_LABELS, "AI label records", "data.labels_dir")
  return None


def sl_cai_model(configured: str, workdir: str) -> str:
  """The one rule for where the SL-CAI model is, used by every stage after SFT.

  The config's model when it names one; otherwise stage 3's export
  `<workdir>/p3_sft/hf`, which must exist.
  """
  if configured:
    return configured
  path = hf_export(workdir, SFT)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"{path}: no SL-CAI model; {run_first(SFT)} or pass --config.model=<bundled asset,"
        " HF directory, .gguf or hub id>")
  return path


def preference_model_dir(configured: str, workdir: str) -> str:
  """Stage 6's output directory: the workdir's ("" configured), or a configured
  directory that is one (or a workdir holding one)."""
  from cai_jax.preference.saved import is_pm_dir
  for candidate in ((configured, stage_dir(configured, PREFERENCE_MODEL)) if configured
                    else (stage_dir(workdir, PREFERENCE_MODEL),)):
    if is_pm_dir(candidate):
      return candidate
  where = configured or stage_dir(workdir, PREFERENCE_MODEL)
  raise FileNotFoundError(f"{where}: no trained preference model; {run_first(PREFERENCE_MODEL)}"
                          " or set --config.reward_model")


def helpful_preference_model_dir(configured: str, workdir: str) -> str:
  """The helpfulness PM (`reward.helpful_pm`): the configured directory (or workdir
  holding one), else the one stage 6 trained with pms="by_kind"."""
  from cai_jax.preference.saved import is_pm_dir
  if configured:
    return preference_model_dir(configured, workdir)
  path = pm_out(workdir, HELPFUL_PM)
  if is_pm_dir(path):
    return path
  raise FileNotFoundError(f"{path}: no helpfulness preference model; run stage 6 with"
                          " --config.pms=by_kind or set --config.reward.helpful_pm to a PM"
                          " trained on helpfulness pairs")


def feedback_model(configured: str, workdir: str) -> str:
  """The feedback model a live reward uses: the configured spec, else stage 5's
  first feedback model (from its `config.json`), which must exist."""
  if configured:
    return configured
  path = os.path.join(stage_dir(workdir, AI_LABELS), "config.json")
  try:
    with open(path) as f:
      models = json.load(f).get("feedback_models") or ()
  except (OSError, ValueError):
    models = ()
  if not models:
    raise FileNotFoundError(f"{path}: no stage-5 feedback model; {run_first(AI_LABELS)} or set"
                            " --config.reward.feedback.model=<bundled asset, HF directory or"
                            " .gguf>")
  return models[0]
