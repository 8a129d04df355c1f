"""Stage 5 (AI feedback labels): soft A/B preferences from a feedback model.

  cai-jax stage ai_labels --config=ai_labels:cpu --workdir=runs/cai

Variants: `tiny` (tests: set `feedback_models` to a tiny model directory),
`cpu` (the bundled model and mode that labelled best), `full` (the paper's recipe
for a large pretrained feedback model: multiple choice, few-shot, both orders, an
ensemble of principles; point `feedback_models` at it, e.g.
`--config.feedback_models='("/ckpt/llama3-70b-hf",)'`).

The default, Qwen2.5-Coder-0.5B asked pointwise Yes/No, was the only bundled model
and mode clearly above chance on human-labelled harm pairs (experiments/README.md).
"""

import ml_collections

from cai_jax.assets import DEFAULT_FEEDBACK_MODELS
from cai_jax.configs import common
from cai_jax.constitution import HELPFUL_POINTWISE, HELPFUL_QUESTION

DEFAULT_MODE = "pointwise"  # with DEFAULT_FEEDBACK_MODELS: see the docstring


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.feedback_models = DEFAULT_FEEDBACK_MODELS  # load_model specs; several = an ensemble
  c.model_ensemble = "mean"  # or "majority" (vote share) across feedback models
  c.dtype = "float32"
  c.decode_layers = "unrolled"  # or "scan": no extra copy of the layer weights, slower decode
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor): scoring is data-parallel
  c.num_devices = 0  # 0: every device; n: the mesh takes the first n
  c.constitution = "harmless"
  c.kinds = ("red_team", "helpful")  # which stage-4 pairs to label
  # Pairs of helpful prompts: "helpfulness" asks the one helpfulness question below
  # (the paper's helpfulness labels asked which answer is more helpful); "constitution"
  # labels them under the harmlessness principles like red-team pairs, which rewards
  # refusing an ordinary request as much as answering it.
  c.helpful_labels = "helpfulness"
  c.helpful_question = HELPFUL_QUESTION
  c.helpful_pointwise = HELPFUL_POINTWISE
  c.mode = DEFAULT_MODE  # "multiple_choice" or "pointwise"
  c.num_principles = 1  # principles drawn per pair; the label is their mean
  c.principle_ids = ()  # fixed principles for every pair instead of draws
  c.num_few_shot = 0  # comparison_few_shot examples in the A/B prompt
  c.order_swap = True  # ask in both orders (removes position bias)
  c.order_combine = "logit"  # mean log-odds over orders ("prob": mean probability)
  c.chain_of_thought = False
  c.cot_clamp = (0.4, 0.6)  # the paper's clamp for chain-of-thought probabilities
  c.cot_max_new_tokens = 96
  c.cot_temperature = 0.0
  c.pointwise_temperature = 1.0
  c.prompt_format = "plain"  # or "chat": the question in the model's chat template
  c.max_response_tokens = 256  # each response cut to this many tokens (0: never)
  c.batch_size = 8
  c.shard_size = 64
  # Leading tokens shared by a batch's prompts (the few-shot examples) are
  # prefilled once at batch 1 when there are at least this many (0: never).
  c.min_shared_prefix = 64
  return common.variant(
      c, arg, "ai_labels",
      cpu={"shard_size": 16},
      tiny={"feedback_models": (),  # tests set a tiny model directory
            "mode": "multiple_choice", "max_response_tokens": 16, "cot_max_new_tokens": 8,
            "shard_size": 3},
      full={"dtype": "bfloat16", "mode": "multiple_choice", "num_principles": 4,
            "num_few_shot": 2, "max_response_tokens": 1024, "batch_size": 64,
            "shard_size": 1024})
