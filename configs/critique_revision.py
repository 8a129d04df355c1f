"""Stage 2 (critique -> revision): the helpful model revises its own answers.

  python -m cai_jax.phases.p2_critique_revision \
      --config=configs/critique_revision.py:cpu --workdir=runs/cai

Variants: `cpu` (SmolLM2-135M, 2 rounds, short answers), `full` (4 rounds as
in the paper, long answers; point `model` at your helpful 7B/70B checkpoint:
a Hugging Face directory, a .gguf file or a hub id).
"""

import ml_collections


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
  if arg == "cpu":
    c.num_rounds = 2
    c.num_few_shot = 1
    c.max_new_tokens = 64
    c.max_prompt_tokens = 1024
    c.shard_size = 8
  elif arg == "tiny":
    c.num_rounds = 2
    c.num_few_shot = 1
    c.max_new_tokens = 16
    c.max_prompt_tokens = 1024
    c.shard_size = 4
  elif arg != "full":
    raise ValueError(f"configs/critique_revision.py: unknown variant {arg!r};"
                     " use cpu, tiny or full")
  return c
