"""Stage 7 (RL-CAI): on-policy RL against the preference model, with a KL penalty
to SL-CAI: PPO (the paper's algorithm, the default) or the critic-free RLOO and
GRPO (`config.algorithm`, with `rollout.samples_per_prompt` responses a prompt).

The policy and the frozen reference start from SL-CAI (`paths.sl_cai_model`)
(with `lora.rank` > 0 the policy is LoRA adapters on the reference's own weights);
the reward is stage 6's PM through the one scorer, or a weighted sum of sources
(the PM, each prompt kind's PM (`gated`), the feedback model live, rules:
`rl.reward`, `reward.sources`); one
iteration of rollout, reward, score pass, advantages and clipped updates is
`rl.learner.Learner.iterate`, run by the one train loop (`training.loop`), a
step being an iteration. beta is fixed (`kl.target` = 0) or moved towards the
target KL per sequence (`rl.ppo.adaptive_kl_coef`) and saved with the data
position; the prompt order is a function of (seed, epoch) and the sampling
keys come from the train state's PRNG key, so a resumed run reproduces the
uninterrupted run bit for bit.

Output, under `<workdir>/p7_ppo/` (`p7_rloo/`, `p7_grpo/` for those algorithms,
so that each can be evaluated beside PPO): `checkpoints/` (Orbax),
`metrics.jsonl`, `tensorboard/`, the final policy as a Hugging Face
directory `hf/`, and with `probe.every` > 0 `probe.jsonl`: the reward of the
policy's greedy answers to the same held-out prompts, before training and every
`probe.every` iterations.

  python -m cai_jax.phases.p7_ppo --config=configs/ppo.py:cpu --workdir=runs/cai
  python -m cai_jax.phases.p7_ppo --config=configs/ppo.py:cpu --config.algorithm=grpo \
      --config.rollout.samples_per_prompt=4 --workdir=runs/cai
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from cai_jax import distributed, paths
from cai_jax.checkpoints.load import load_model
from cai_jax.constitution import HELPFUL_PRINCIPLE, helpfulness_constitution, load_constitution
from cai_jax.data import prompts, rollout_prompts
from cai_jax.feedback.labeler import FeedbackModel, Labeler, LabelerSettings
from cai_jax.model import lora
from cai_jax.model.sharding import sharder_from_config
from cai_jax.phases import cli
from cai_jax.preference import model as pm
from cai_jax.preference.saved import restore_preference_model
from cai_jax.preference.scorer import Scorer
from cai_jax.rl import ppo
from cai_jax.rl import learner as learner_lib
from cai_jax.rl import reward as reward_lib
from cai_jax.training import loop as train_loop
from cai_jax.training import optim, setup
from cai_jax.training.export import export_hf


def run(config: ml_collections.ConfigDict, workdir: str, *,
        reward_fn: reward_lib.RewardFn | None = None,
        should_stop: Callable[[int], bool] | None = None) -> setup.Result:
  """Train (or resume) `learner.iterations` iterations; `Result.step` counts them.

  `reward_fn` replaces the configured reward sources (tests: a programmatic reward).
  `should_stop(iteration)` is polled after every iteration, like SIGTERM: True
  saves a checkpoint and returns status "preempted". A non-finite loss or
  parameter raises FloatingPointError without saving.
  """
  c = config
  learner_lib.check_config(c)
  stage, critic = paths.rl_stage(c.algorithm), learner_lib.has_critic(c)
  out = paths.stage_dir(workdir, stage)
  model_key, head_key, state_key, pm_key = jax.random.split(jax.random.key(c.seed), 4)

  # --- Mesh, models, prompts ---
  sharder = sharder_from_config(c)
  spec = paths.sl_cai_model(c.model, workdir)
  cfg, ref_params, tok = load_model(spec, sharder, tokenizer=c.tokenizer, key=model_key,
                                    **dict(c.model_overrides))
  logging.info("policy/reference %s: %s, %.1fM params", spec, cfg.family,
               cfg.num_params() / 1e6)
  records = [r for path in paths.require_prompts(workdir, "train", c.data.kinds)
             for r in prompts.read_jsonl(path)]
  texts = [r.prompt for r in records]
  prompt_set = rollout_prompts.render_prompts(tok, texts, c.data.max_prompt_len)
  if len(prompt_set.ids) < c.rollout.batch_size:
    raise ValueError(f"{len(prompt_set.ids)} usable prompts, fewer than rollout.batch_size="
                     f"{c.rollout.batch_size}")
  probe = c.get("probe", {})
  probe_every = int(probe.get("every", 0))
  if probe_every:  # the first num_prompts held-out prompts of each kind, never trained on
    held = [r for path in paths.require_prompts(workdir, "held_out", c.data.kinds)
            for r in prompts.read_jsonl(path)[:probe.get("num_prompts", 8)]]
    probe_set = rollout_prompts.render_prompts(tok, [r.prompt for r in held],
                                               c.data.max_prompt_len)
    kinds_of = {r.prompt: r.kind for r in records} | {r.prompt: r.kind for r in held}
  else:
    kinds_of = {r.prompt: r.kind for r in records}
  # Every prompt the reward may see (rollouts and probe), as the policy rendered it.
  ids_of = dict(zip(prompt_set.texts, prompt_set.ids))
  if probe_every:
    ids_of |= dict(zip(probe_set.texts, probe_set.ids))

  # --- The reward: weighted sources (`rl.reward`) ---
  reward = None
  if reward_fn is None:
    sources = reward_lib.parse_sources(c.reward.sources)
    fns: dict[str, reward_lib.RewardFn] = {}
    def pm_source(configured: str, key: jax.Array) -> reward_lib.RewardFn:
      if configured.startswith("random:"):  # smoke runs: a random scalar model
        pm_cfg, pm_params, pm_tok = pm.init_scalar_model(
            configured, sharder, key, tokenizer=c.tokenizer, **dict(c.model_overrides))
      else:  # a PM directory, or a workdir holding one
        pm_cfg, pm_params, pm_tok = restore_preference_model(
            paths.preference_model_dir(configured, workdir), sharder)
      return reward_lib.pm_source(
          Scorer(pm_cfg, pm_params, pm_tok, max_len=c.reward.max_len, sharder=sharder),
          tok, ids_of, c.reward.pm_input)

    @functools.cache  # each PM loaded once, whichever sources read it
    def harm_pm() -> reward_lib.RewardFn:
      return pm_source(c.reward_model, pm_key)

    @functools.cache
    def helpful_pm() -> reward_lib.RewardFn:
      configured = c.reward.get("helpful_pm", "")
      return pm_source(configured if configured.startswith("random:")
                       else paths.helpful_preference_model_dir(configured, workdir),
                       jax.random.fold_in(pm_key, 1))

    for name, _ in sources:
      if name == "pm":
        fns[name] = harm_pm()
      elif name == "helpful_pm":
        fns[name] = helpful_pm()
      elif name == "gated":  # each prompt kind's PM (stage 6 with pms="by_kind")
        gate = c.reward.get("gate", {})
        fns[name] = reward_lib.GatedReward(
            harm_pm(), helpful_pm(), kinds_of,
            threshold=gate.get("threshold", 0.15), rule=gate.get("rule", "kind"))
      elif name in ("feedback", "feedback_by_kind"):
        f = c.reward.feedback
        model = FeedbackModel.load(paths.feedback_model(f.model, workdir), sharder, f.dtype)
        settings = dict(mode="pointwise", prompt_format=f.prompt_format,
                        batch_size=f.batch_size, max_response_tokens=f.max_response_tokens)
        base = load_constitution(f.constitution)
        labeler = Labeler([model], base, LabelerSettings(principle_ids=(f.principle,),
                                                         **settings))
        if name == "feedback":
          fns[name] = reward_lib.feedback_reward_fn(labeler, f.principle, tok)
        else:  # stage 5's helpfulness question for helpful prompts
          helpful = Labeler([model], helpfulness_constitution(base), LabelerSettings(
              principle_ids=(HELPFUL_PRINCIPLE,), **settings))
          fns[name] = reward_lib.feedback_by_kind_reward_fn(
              {"red_team": (labeler, f.principle), "helpful": (helpful, HELPFUL_PRINCIPLE)},
              kinds_of, tok)
      elif name == "overlong":
        fns[name] = reward_lib.overlong_reward_fn(c.reward.overlong_after,
                                                  c.rollout.max_new_tokens)
      else:  # refusal
        fns[name] = reward_lib.refusal_reward_fn(tok, kinds_of)
    reward_fn = reward = reward_lib.WeightedReward([(n, w, fns[n]) for n, w in sources],
                                                   c.reward.normalize)
  iterations = c.learner.iterations
  sequences = c.rollout.batch_size * c.rollout.samples_per_prompt
  updates = iterations * c.learner.epochs * (sequences // c.train.minibatch_size)

  # --- Optimizer, state, checkpoints (LoRA: adapters (+ head) on the reference) ---
  lora_spec = lora.LoraSpec.from_config(c.get("lora"))
  abstract = learner_lib.abstract_policy(cfg, critic, lora_spec)
  s = setup.prepare(os.path.join(out, "checkpoints"), c.optim, updates, abstract,
                    learner_lib.policy_shardings(cfg, sharder, critic, lora_spec), sharder,
                    c.train.keep_checkpoints)
  width = prompt_set.width(c.data.max_prompt_len)
  if probe_every:  # one prompt width for both: one compiled sampler
    width = max(width, probe_set.width(c.data.max_prompt_len))
  learner = learner_lib.Learner(c, cfg, tok, sharder, reward_fn, s.tx, width)
  data_info = {"fingerprint": prompt_set.fingerprint(), "num_prompts": len(prompt_set.ids),
               "batch_size": c.rollout.batch_size, "seed": c.seed}
  if c.rollout.samples_per_prompt != 1:  # absent at K = 1: PPO workdirs of before resume
    data_info["samples_per_prompt"] = c.rollout.samples_per_prompt
  if lora_spec is not None:
    data_info |= lora_spec.identity(spec)
  # No donation: the policy starts as a copy, the reference stays as loaded.
  init = jax.jit(lambda p, hk, k: optim.init_train_state(
      learner_lib.init_policy(p, cfg, hk, critic, lora_spec), s.tx, k),
      out_shardings=s.state_sh)
  state = setup.init_or_restore(s, abstract, lambda: init(ref_params, head_key, state_key),
                                data_info)
  start, kl = 0, {"coef": float(c.kl.coef)}
  if s.ckpt.latest_step() is not None:
    saved = s.ckpt.restore_data()
    start, kl["coef"] = int(saved["iteration"]), float(saved["kl_coef"])
    if reward is not None and "reward_norm" in saved:
      reward.load_state(saved["reward_norm"])
  normalized = reward is not None and reward.stateful

  # --- The probe: the same held-out prompts, answered greedily, scored without state ---
  probe_file = paths.probe_file(workdir, stage)

  def run_probe(state, iteration: int) -> float:
    tokens, lengths = learner.answer(state, ref_params, probe_set.ids)
    score = getattr(reward_fn, "raw", reward_fn)
    scores = np.asarray(score(probe_set.texts, tokens, lengths), np.float64)
    if distributed.is_leader():
      with open(probe_file, "a") as f:
        f.write(json.dumps({"iteration": iteration, "prompts": probe_set.texts,
                            "scores": scores.tolist()}) + "\n")
    return float(scores.mean())

  # --- Iterations: a loop step is one RL iteration ---
  position = {"iteration": start}

  def step_fn(state, rows):
    it = position["iteration"]
    probed = {"probe/reward_before": run_probe(state, 0)} if probe_every and it == 0 else {}
    state, metrics = learner.iterate(state, ref_params, [prompt_set.texts[i] for i in rows],
                                     [prompt_set.ids[i] for i in rows], kl["coef"])
    position["iteration"] = it + 1
    if probe_every and ((it + 1) % probe_every == 0 or it + 1 == iterations):
      metrics["probe/reward"] = run_probe(state, it + 1)
    metrics.update(probed)
    metrics["finite"] = bool(metrics["finite"]) and bool(np.isfinite(metrics["policy_loss"]))
    if metrics["finite"] and c.kl.target:
      kl["coef"] = ppo.adaptive_kl_coef(kl["coef"], metrics["kl"], c.kl.target, c.kl.horizon,
                                        sequences)
    return state, metrics

  loop = train_loop.Loop(
      name=c.algorithm, unit="iter", step_fn=step_fn,
      batch_at=lambda it: rollout_prompts.prompt_rows(len(prompt_set.ids),
                                                      c.rollout.batch_size, c.seed, it),
      position=lambda it: {"iteration": it, "kl_coef": kl["coef"], **data_info,
                           **({"reward_norm": reward.state()} if normalized else {})},
      summarize=lambda fetched: {k: v for k, v in fetched[-1].items() if k != "finite"},
      units=len, rate_name=None, evaluate=None,
      postfix=lambda last: {"reward": f"{last['reward']:.3f}", "kl": f"{last['kl']:.3f}"},
      save_every=c.train.save_every, eval_every=1, log_every=1)
  return setup.train(loop, state, start, iterations, s, out, should_stop, export=lambda p, it:
                     export_hf(learner.rollout_params(p, ref_params), cfg, tok,
                               paths.hf_export(workdir, stage), it))


if __name__ == "__main__":
  cli.main(run, stage="ppo")
