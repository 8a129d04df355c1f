"""Stage 2 (critique -> revision): the helpful model revises its own answers.

  cai-jax stage critique_revision --config=critique_revision:cpu --workdir=runs/cai

Variants: `cpu` (SmolLM2-135M, 2 rounds, short answers), `full` (4 rounds as
in the paper, long answers; point `model` at your helpful 7B/70B checkpoint:
a Hugging Face directory, a .gguf file or a hub id).
"""

import ml_collections

from cai_jax.configs import common


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "smollm2-135m-instruct"
  # Who writes critiques and revisions of the policy's answers: "" = the policy
  # itself (the paper); a load spec = a stronger model (the HF CAI recipe).
  c.reviser = ""
  c.dtype = "float32"
  c.decode_layers = "unrolled"  # or "scan": no extra copy of the layer weights, slower decode
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor): sampling is data-parallel
  c.num_devices = 0  # 0: every device; n: the mesh takes the first n
  c.constitution = "harmless"
  c.mode = "critique"  # or "direct": revise without a critique (ablation)
  c.num_rounds = 4
  c.num_few_shot = 2
  # Appended to each revision request: small models otherwise describe the
  # response instead of rewriting it.
  c.revision_instruction = "Reply with the rewritten response only."
  c.max_new_tokens = 256
  c.max_prompt_tokens = 1536
  c.shard_size = 64
  c.sampling = dict(temperature=0.7, top_k=0, top_p=0.9)
  # Leading tokens shared by a batch's prompts (the few-shot examples) are
  # prefilled once at batch 1 when there are at least this many (0: never).
  c.min_shared_prefix = 64
  small = {"num_rounds": 2, "num_few_shot": 1, "max_prompt_tokens": 1024}
  return common.variant(c, arg, "critique_revision",
                        cpu={**small, "max_new_tokens": 64, "shard_size": 8},
                        tiny={**small, "max_new_tokens": 16, "shard_size": 4},
                        full={})
