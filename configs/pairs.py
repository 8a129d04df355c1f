"""Stage 4 (response pairs): two samples per prompt from the SL-CAI model.

  cai-jax stage pairs --config=pairs:cpu --workdir=runs/cai

`model` defaults to "" = stage 3's export `<workdir>/p3_sft/hf` (the SL-CAI
model); set it to sample from another model, e.g.
`--config.model=smollm2-135m-instruct` to skip SFT in a smoke run.

Variants: `tiny` (tests), `cpu` (short answers on a laptop), `full`
(accelerators; long answers, big shards).
"""

import ml_collections

from cai_jax.configs import common


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ""  # "": <workdir>/p3_sft/hf; else any load_model spec
  c.dtype = "float32"
  c.decode_layers = "unrolled"  # or "scan": no extra copy of the layer weights, slower decode
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor): sampling is data-parallel
  c.num_devices = 0  # 0: every device; n: the mesh takes the first n
  c.max_new_tokens = 256
  c.max_prompt_tokens = 1024
  c.shard_size = 64
  # Two independent samples at temperature 1 (the policy's own distribution),
  # so the pair differs and the feedback model has something to choose between.
  c.sampling = dict(temperature=1.0, top_k=0, top_p=0.95)
  # Also stage 2's (initial answer, last revision) of each red-team prompt as a pair
  # (labelled by stage 5 like the rest): contrasts the samples seldom show.
  c.revision_pairs = False
  # Also each helpful prompt's first sample against a canned refusal (data/refusals.py),
  # labelled by stage 5 like the rest: the samples never show a refusal of an ordinary
  # request, so the PM cannot learn that it is unhelpful.
  c.refusal_pairs = False
  return common.variant(c, arg, "pairs",
                        cpu={"max_new_tokens": 96, "shard_size": 8},
                        tiny={"max_new_tokens": 8, "shard_size": 4},
                        full={"dtype": "bfloat16", "max_new_tokens": 512,
                              "max_prompt_tokens": 2048, "shard_size": 512})
