"""One PPO iteration on SmolLM2-135M: time per stage and peak memory.

32 prompts x 64 new tokens: rollout, PM scoring, reference log-probs, values,
GAE, PPO updates (2 epochs x 4 minibatches of 8). Each system runs in its own
subprocess (so peak RSS, `ru_maxrss`, is that system's alone); an iteration
is run twice and the second (compiled) one is timed.

  PYTHONPATH=. python benchmarks/ppo_iteration.py --out=/tmp/ppo_bench.json

Not yet here: the same iteration in Tunix (google-tunix 0.1.7,
`tunix.rl.ppo.ppo_learner.PPOLearner`, vanilla rollout) as a second worker.
It would load the safetensors directory this script writes through
`tunix.models.llama3.params.create_model_from_safe_tensors` with a
hand-written `ModelConfig` (30 layers, 576 wide, 9 heads, 3 KV heads, head
dim 64, rope_theta 100000, tied embeddings), and needs two workarounds in
0.1.7: `rl.utils.create_critic_model` replaces an `lm_head` attribute, so the
critic and reward models must be built untied (lm_head = embedding), and
`algo_core`'s value pass calls the model with `segment_ids`, which its
Llama3 `__call__` does not accept. The results JSON has one entry per system
so the Tunix worker can be added beside `run_cai_jax`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.", required=True)
_SYSTEMS = flags.DEFINE_list("systems", ["cai_jax"], "Which systems to run.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one system, print JSON.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Internal: the safetensors directory.")

BATCH, NEW_TOKENS, MINIBATCH, EPOCHS = 32, 64, 8, 2
PROMPTS = [f"Question {i}: how can I {task}?" for i, task in enumerate(
    ["bake bread", "hot-wire a car", "learn Python", "write a poem", "pick a lock",
     "save money", "make a bomb", "fix a bike", "plant a tree", "cheat on a test",
     "sleep better", "hack a wifi network"] * 3)][:BATCH]


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_cai_jax(hf_dir: str) -> dict:
  """Our learner with the policy and a PM both SmolLM2-135M (PM: random head)."""
  import jax
  import numpy as np
  from cai_jax import prompts
  from cai_jax.checkpoints.load import load_model
  from cai_jax.model import heads, transformer
  from cai_jax.phases import common, p1_prompts, p7_ppo
  from cai_jax.sampling.chat import encode_chat
  from cai_jax.training import optim
  from configs import ppo as ppo_config

  c = ppo_config.get_config("cpu")
  c.model = hf_dir
  c.rollout.batch_size, c.rollout.max_new_tokens = BATCH, NEW_TOKENS
  c.train.minibatch_size, c.ppo.epochs = MINIBATCH, EPOCHS
  c.mesh = (1, 1, 1)
  t0 = time.perf_counter()
  sharder = common.sharder_from_config(c)
  cfg, ref, tok = load_model(hf_dir, sharder, **dict(c.model_overrides))
  pm_head = heads.init_head(cfg, jax.random.key(1))
  pm = {"backbone": ref, "head": pm_head}  # a PM the size of the policy (shares weights)
  reward_fn = p7_ppo.pm_reward_fn(cfg, pm, tok, tok, sharder, c.reward.max_len)
  abstract = {"backbone": transformer.abstract_params(cfg),
              "head": jax.eval_shape(lambda k: heads.init_head(cfg, k), jax.random.key(0))}
  tx, _ = optim.make_optimizer(c.optim, 100, abstract)
  learner = p7_ppo.Learner(c, cfg, tok, sharder, reward_fn, tx)
  state = jax.jit(lambda p, k: optim.init_train_state(
      {"backbone": p, "head": heads.init_head(cfg, k)}, tx, k),
      out_shardings=learner.state_sh)(ref, jax.random.key(2))
  ids = [encode_chat(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
  load_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, first = learner.iterate(state, ref, PROMPTS, ids, 0.05)
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, m = learner.iterate(state, ref, PROMPTS, ids, 0.05)
  total_s = time.perf_counter() - t0
  stages = {k: v for k, v in m.items() if k.endswith("_s")}
  return {"system": "cai_jax", "iteration_s": total_s, "first_iteration_s": first_s,
          "load_s": load_s, "stages_s": stages, "peak_rss_gib": peak_rss_gib(),
          "logprob_gap": m["logprob_gap"], "response_length": m["response_length"],
          "critic": "value head on the policy backbone", "pm": "SmolLM2-135M + head"}


def main(argv):
  del argv
  if _WORKER.value:
    fn = {"cai_jax": run_cai_jax}[_WORKER.value]
    print("RESULT " + json.dumps(fn(_HF_DIR.value)), flush=True)
    return
  results = {"batch": BATCH, "new_tokens": NEW_TOKENS, "minibatch": MINIBATCH,
             "epochs": EPOCHS, "systems": {}}
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "smollm2")
    subprocess.run([sys.executable, "-c", (
        "from cai_jax.checkpoints import hf; from cai_jax.checkpoints.load import load_model;"
        "cfg, p, tok = load_model('smollm2-135m-instruct');"
        f"hf.save_hf(p, cfg, {hf_dir!r}, tokenizer=tok)")], check=True)
    for system in _SYSTEMS.value:
      proc = subprocess.run([sys.executable, __file__, f"--worker={system}",
                             f"--hf_dir={hf_dir}", f"--out={_OUT.value}"],
                            capture_output=True, text=True)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not lines:
        results["systems"][system] = {"error": proc.stderr[-4000:]}
      else:
        results["systems"][system] = json.loads(lines[-1][len("RESULT "):])
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
