"""The on-policy RL learner: one iteration of rollout, reward, score pass,
advantages and clipped updates, for PPO (the paper's algorithm, the default) or
the critic-free RLOO and GRPO (`config.algorithm`).

Each iteration, in the paper's order:

  1. rollout   the policy samples `rollout.samples_per_prompt` (C) responses to
               each prompt (jit sampler, temperature tau), recording the sampled
               tokens' log-probs;
  2. reward    `reward_fn` scores each (prompt, response): the PM through the
               one scorer (`rl.reward`), or any programmatic reward; a
               response with no end-of-turn token loses `reward.no_eos_penalty`;
  3. score     one jitted pass recomputes the policy's log-probs (and, for PPO,
               values) and the frozen reference's log-probs of the sampled tokens;
  4. advantage PPO: r_t = -beta * kl_t + [t = last] * score (`rl.ppo.token_rewards`),
               optionally whitened, then GAE; advantages whitened.
               RLOO / GRPO: R = score - beta * sum_t kl_t, then the leave-one-out
               or group-normalised advantage over each prompt's C responses
               (`rl.critic_free`), on every token of the response;
  5. update    `learner.epochs` passes over shuffled minibatches of the rollout:
               clipped policy loss (+ vf_coef * clipped value loss for PPO)
               - ent_coef * entropy, token means over the minibatch.

The KL has one knob, `config.kl` (coefficient, estimator, target), and
enters only through the reward: there is no second KL loss term.

Critic (PPO only; RLOO and GRPO have no value head): the value head sits on
the policy's backbone (one model, params `{"backbone", "head"}` like
`model.heads`), not on a separate critic model.
A separate critic costs another model's params plus its two Adam moments
(3x params) and another forward+backward over every minibatch; sharing the
backbone makes step 3 one policy pass giving both log-probs and values and
step 5 one backward. The cost is that value-loss gradients also move the
policy's features (kept small by `vf_coef`), and the critic starts from the
LM rather than from the preference model.

Log-probs are computed from hidden states in chunks of M (`rl.ppo.token_logprobs`):
only the sampled tokens' log-probs and the entropy leave each chunk, never
[B, M, V] float32 logits; and only the response positions are unembedded.
The sampling keys and minibatch orders come from the PRNG key in the train
state, so an iteration is a pure function of (state, prompts, beta).

LoRA (`config.lora.rank` > 0, `cai_jax.model.lora`): the trained params are
`{"adapters"}` (+ `"head"`), the policy is the frozen reference with the adapters
attached, and the reference is that same base with them off: one copy of the
weights for both, and optimizer state for the adapters (and head) alone. The
rollout samples from the merged weights (merged once per iteration).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cai_jax import distributed
from cai_jax.model import heads, lora as lora_lib, transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.rl import critic_free, ppo
from cai_jax.rl.reward import RewardFn
from cai_jax.sampling.sampler import Sampler, SamplingParams, sequence_keys
from cai_jax.sampling.engine import Engine
from cai_jax.text import padding
from cai_jax.text.tokenizer import Tokenizer
from cai_jax.training import optim


def response_hidden(backbone, batch, *, cfg: ModelConfig, sharder: Sharder | None,
                    prompt_len: int) -> jax.Array:
  """Hidden states [B, M, D] at the positions that predict the M response tokens."""
  x_BSD, _ = transformer.hidden_states(backbone, batch["inputs"], cfg,
                                       mask_BT=batch["input_mask"], sharder=sharder)
  return x_BSD[:, prompt_len - 1:]


def score_pass(policy, ref, batch, *, cfg: ModelConfig, sharder: Sharder | None,
               prompt_len: int, temperature: float, chunk: int,
               lora: lora_lib.LoraSpec | None = None) -> dict[str, jax.Array]:
  """Policy log-probs (and values when the policy has a head), reference
  log-probs of the sampled tokens (no grads)."""
  policy = lora_lib.scalar_view(policy, ref, lora)
  hidden = functools.partial(response_hidden, batch=batch, cfg=cfg, sharder=sharder,
                             prompt_len=prompt_len)
  x_BMD = hidden(policy["backbone"])
  unembed = lambda p: (lambda x: transformer.logits_from_hidden(p, x, cfg))
  logp_BM, _ = ppo.token_logprobs(x_BMD, unembed(policy["backbone"]), batch["targets"],
                                  temperature, chunk, with_entropy=False)
  ref_logp_BM, _ = ppo.token_logprobs(hidden(ref), unembed(ref), batch["targets"],
                                      temperature, chunk, with_entropy=False)
  out = {"logp": logp_BM, "ref_logp": ref_logp_BM}
  if "head" in policy:
    out["values"] = heads.head_values(policy["head"], x_BMD)
  return out


def _kl(logp_BM, ref_logp_BM, mask_BM, estimator: str) -> tuple[jax.Array, dict]:
  """The penalty's per-token KL estimate, and each sequence's sum of it and of k1."""
  kl_BM = ppo.KL_ESTIMATORS[estimator](logp_BM, ref_logp_BM) * mask_BM
  return kl_BM, {"kl_B": jnp.sum(kl_BM, axis=1),
                 "k1_B": jnp.sum(ppo.kl_k1(logp_BM, ref_logp_BM) * mask_BM, axis=1)}


def advantages(scores_B, logp_BM, ref_logp_BM, values_BM, mask_BM, kl_coef, *,
               estimator: str, gamma: float, lam: float, whiten_rewards: bool
               ) -> dict[str, jax.Array]:
  """PPO: per-token KL-penalised rewards, GAE on the value head, whitened."""
  kl_BM, sums = _kl(logp_BM, ref_logp_BM, mask_BM, estimator)
  rewards_BM = ppo.token_rewards(scores_B, kl_BM, mask_BM, kl_coef)
  if whiten_rewards:
    rewards_BM = ppo.whiten(rewards_BM, mask_BM, shift_mean=False)
  adv_BM, returns_BM = ppo.gae(rewards_BM, values_BM, mask_BM, gamma, lam)
  return {"adv": ppo.whiten(adv_BM, mask_BM), "returns": returns_BM, **sums}


def group_advantages(scores_B, logp_BM, ref_logp_BM, mask_BM, kl_coef, *, algorithm: str,
                     estimator: str, samples_per_prompt: int) -> dict[str, jax.Array]:
  """RLOO / GRPO: sequence rewards R = score - beta * KL, the group's advantage."""
  kl_BM, sums = _kl(logp_BM, ref_logp_BM, mask_BM, estimator)
  rewards_B = critic_free.sequence_rewards(scores_B, kl_BM, mask_BM, kl_coef)
  C = samples_per_prompt
  return {"adv": critic_free.token_advantages(algorithm, rewards_B, mask_BM, C), **sums,
          "group_std_Q": jnp.std(rewards_B.reshape(-1, C), axis=1, ddof=1)}


def loss_fn(params, mb, *, cfg: ModelConfig, sharder: Sharder | None, prompt_len: int,
            temperature: float, chunk: int, clip_eps: float, value_clip: float,
            vf_coef: float, ent_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(policy (+ vf_coef * value) - ent_coef * entropy loss sums, stats) of one
  microbatch; the value term only when the policy has a head (PPO)."""
  x_BMD = response_hidden(params["backbone"], mb, cfg=cfg, sharder=sharder,
                          prompt_len=prompt_len)
  unembed = lambda x: transformer.logits_from_hidden(params["backbone"], x, cfg)
  logp_BM, ent_BM = ppo.token_logprobs(x_BMD, unembed, mb["targets"], temperature, chunk)
  mask_BM = mb["mask"]
  pg, count = ppo.policy_loss(logp_BM, mb["old_logp"], mb["adv"], mask_BM, clip_eps)
  ent, _ = ppo.entropy_sum(ent_BM, mask_BM)
  clipped, _ = ppo.clipped_count(logp_BM, mb["old_logp"], mb["adv"], mask_BM, clip_eps)
  approx_kl = jnp.sum(jnp.where(mask_BM > 0, ppo.kl_k3(logp_BM, mb["old_logp"]), 0.0))
  stats = {"pg": pg, "ent": ent, "clipped": clipped, "approx_kl": approx_kl, "tokens": count}
  total = pg - ent_coef * ent
  if "head" in params:
    values_BM = heads.head_values(params["head"], x_BMD)
    stats["vf"], _ = ppo.value_loss(values_BM, mb["old_values"], mb["returns"], mask_BM,
                                    value_clip)
    total = total + vf_coef * stats["vf"]
  return total, stats


def train_step(state: optim.TrainState, mb, ref=None, *, tx: optax.GradientTransformation,
               microbatches: int, sharder: Sharder | None,
               lora: lora_lib.LoraSpec | None = None, **loss_kw
               ) -> tuple[optim.TrainState, dict[str, jax.Array]]:
  """One AdamW update on the token-mean clipped loss of a minibatch (with LoRA, of
  the adapters on `ref`)."""
  loss = lambda p, b: loss_fn(lora_lib.scalar_view(p, ref, lora), b, sharder=sharder, **loss_kw)
  return optim.gradient_step(
      state, mb, loss, tx=tx, count="tokens", microbatches=microbatches, sharder=sharder,
      metrics=lambda s, tokens: {k: v / tokens for k, v in s.items() if k != "tokens"},
      finite=("pg", "vf"))


def _timed(timings: dict[str, float], name: str, t0: float, value=None):
  jax.block_until_ready(value)
  timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
  return value


def check_config(c: ml_collections.ConfigDict) -> None:
  """One-line errors for the algorithm and rollout fields, before anything loads."""
  if c.algorithm not in critic_free.ALGORITHMS:
    raise ValueError(f"algorithm={c.algorithm!r}: use one of {list(critic_free.ALGORITHMS)}")
  r, C = c.rollout, c.rollout.samples_per_prompt
  if C < 1:
    raise ValueError(f"rollout.samples_per_prompt={C}: it must be at least 1")
  if C < 2 and c.algorithm != "ppo":
    raise ValueError(f"rollout.samples_per_prompt={C}: {c.algorithm} compares each"
                     " response with the others of its prompt, so it needs at least 2")
  if r.temperature <= 0:  # and no top-k / top-p: the sampler's log-probs are pi's
    raise ValueError(f"rollout.temperature={r.temperature}: RL samples from the"
                     " policy, so it must be > 0")
  if (r.batch_size * C) % c.train.minibatch_size:
    raise ValueError(f"rollout.batch_size x rollout.samples_per_prompt = {r.batch_size * C}"
                     f" sequences is not a multiple of train.minibatch_size="
                     f"{c.train.minibatch_size}")


def has_critic(c: ml_collections.ConfigDict) -> bool:
  """PPO trains a value head on the policy's backbone; RLOO and GRPO have none."""
  return c.algorithm == "ppo"


def abstract_policy(cfg: ModelConfig, critic: bool, lora: lora_lib.LoraSpec | None = None):
  """The trained params' shapes: `{"backbone", "head"}` with a critic, else `{"backbone"}`;
  with LoRA `"adapters"` in place of `"backbone"`."""
  trunk = ({"backbone": transformer.abstract_params(cfg)} if lora is None
           else {"adapters": lora_lib.abstract_adapters(cfg, lora)})
  return {**trunk, **({"head": heads.abstract_head(cfg)} if critic else {})}


def policy_shardings(cfg: ModelConfig, sharder: Sharder, critic: bool,
                     lora: lora_lib.LoraSpec | None = None):
  trunk = ({"backbone": transformer.param_shardings(cfg, sharder)} if lora is None
           else {"adapters": lora_lib.adapter_shardings(cfg, lora, sharder)})
  return {**trunk, **({"head": heads.head_shardings(cfg, sharder)} if critic else {})}


def init_policy(backbone, cfg: ModelConfig, head_key: jax.Array, critic: bool,
                lora: lora_lib.LoraSpec | None = None):
  """The policy at iteration 0: SL-CAI's weights, or untrained adapters on them (so
  the same model), plus a fresh value head for PPO."""
  trunk = ({"backbone": backbone} if lora is None else
           {"adapters": lora_lib.init_adapters(cfg, lora, jax.random.fold_in(head_key, 1))})
  return {**trunk, **({"head": heads.init_head(cfg, head_key)} if critic else {})}


@dataclasses.dataclass
class Learner:
  """The jitted pieces of one RL iteration, for one model, mesh and config."""

  config: ml_collections.ConfigDict
  cfg: ModelConfig
  tok: Tokenizer
  sharder: Sharder
  reward_fn: RewardFn
  tx: optax.GradientTransformation
  prompt_len: int  # the rollout's prompt width (`PromptSet.width`), <= data.max_prompt_len

  def __post_init__(self):
    c, cfg, sharder = self.config, self.cfg, self.sharder
    check_config(c)
    r, lc = c.rollout, c.learner
    self.critic, self.C = has_critic(c), int(r.samples_per_prompt)
    self.P, self.M = self.prompt_len, r.max_new_tokens
    slots = int(r.get("engine_slots", 0))
    if slots:  # continuous batching (sampling/engine.py): the same rollouts, refilled slots
      self.sampler = Engine(cfg, slots=slots, max_new_tokens=self.M,
                            stop_ids=cfg.eos_token_ids, pad_id=self.tok.pad_id,
                            sharder=sharder, length_buckets=(self.P,))
    else:
      self.sampler = Sampler(cfg, max_new_tokens=self.M, stop_ids=cfg.eos_token_ids,
                             pad_id=self.tok.pad_id, sharder=sharder, length_buckets=(self.P,))
    self.sampling = SamplingParams(temperature=float(r.temperature))
    self.lora = lora_lib.LoraSpec.from_config(c.get("lora"))
    abstract = abstract_policy(cfg, self.critic, self.lora)
    self.param_sh = policy_shardings(cfg, sharder, self.critic, self.lora)
    self.state_sh = optim.train_state_shardings(self.tx, abstract, self.param_sh, sharder)
    ref_sh = transformer.param_shardings(cfg, sharder)
    if self.lora is not None:  # the rollout's weights: adapters merged, once an iteration
      self._merged = jax.jit(lambda p, ref: lora_lib.merge(ref, p["adapters"], self.lora),
                             in_shardings=(self.param_sh, ref_sh), out_shardings=ref_sh)
    row_sh = sharder.sharding(("batch", None))
    self.row_sh, self.vec_sh = row_sh, sharder.sharding(("batch",))
    common_kw = dict(cfg=cfg, sharder=sharder, prompt_len=self.P,
                     temperature=float(r.temperature), chunk=c.train.logits_chunk)
    self._score = jax.jit(functools.partial(score_pass, lora=self.lora, **common_kw),
                          in_shardings=(self.param_sh, ref_sh, row_sh),
                          out_shardings=row_sh)
    if self.critic:
      self._advantages = jax.jit(functools.partial(
          advantages, estimator=c.kl.estimator, gamma=lc.gamma, lam=lc.lam,
          whiten_rewards=lc.whiten_rewards))
    else:
      self._advantages = jax.jit(functools.partial(
          group_advantages, algorithm=c.algorithm, estimator=c.kl.estimator,
          samples_per_prompt=self.C))
    self._step = jax.jit(
        functools.partial(train_step, tx=self.tx, microbatches=c.train.microbatches,
                          clip_eps=lc.clip_eps, value_clip=lc.value_clip,
                          vf_coef=lc.vf_coef, ent_coef=lc.ent_coef, lora=self.lora,
                          **common_kw),
        in_shardings=(self.state_sh, row_sh, ref_sh if self.lora else None),
        out_shardings=(self.state_sh, sharder.replicated), donate_argnums=0)

  def rollout_params(self, params, ref_params):
    """The weights the rollout samples from."""
    return params["backbone"] if self.lora is None else self._merged(params, ref_params)

  def answer(self, state: optim.TrainState, ref_params, prompt_ids: Sequence[Sequence[int]]
             ) -> tuple[np.ndarray, np.ndarray]:
    """The policy's greedy answers (tokens [B, M], lengths [B]) to `prompt_ids`, with
    no change to `state`: the fixed probe set's answers (`probe` in stage 7)."""
    keys = sequence_keys(jax.random.key(0), list(range(len(prompt_ids))))  # unused: greedy
    out = self.sampler.generate(self.rollout_params(state.params, ref_params), prompt_ids,
                                keys, SamplingParams(temperature=0.0))
    return np.asarray(out.tokens), np.asarray(out.lengths)

  def iterate(self, state: optim.TrainState, ref_params, prompt_texts: Sequence[str],
              prompt_ids: Sequence[Sequence[int]], kl_coef: float
              ) -> tuple[optim.TrainState, dict[str, float]]:
    """Rollout, reward, score pass, advantages and the clipped updates over C
    samples of each prompt; returns (state, metrics)."""
    c, P, M, C = self.config, self.P, self.M, self.C
    # Prompt-major: rows q*C .. q*C + C - 1 answer prompt q (`rl.critic_free`).
    prompt_texts = [t for t in prompt_texts for _ in range(C)]
    prompt_ids = [ids for ids in prompt_ids for _ in range(C)]
    B = len(prompt_ids)
    timings: dict[str, float] = {}
    key, rollout_key, shuffle_key = jax.random.split(state.key, 3)
    state = state.replace(key=key)

    # 1. Rollout.
    t0 = time.perf_counter()
    keys = sequence_keys(rollout_key, list(range(B)))
    out = self.sampler.generate(self.rollout_params(state.params, ref_params), prompt_ids,
                                keys, self.sampling)
    tokens_BM, sample_logp_BM, lengths_B = (np.asarray(out.tokens), np.asarray(out.logprobs),
                                            np.asarray(out.lengths))
    _timed(timings, "rollout_s", t0)

    # 2. Reward.
    t0 = time.perf_counter()
    scores_B = np.asarray(self.reward_fn(prompt_texts, tokens_BM, lengths_B), np.float32)
    _timed(timings, "reward_s", t0)
    has_eos_B = np.isin(tokens_BM[np.arange(B), lengths_B - 1], self.cfg.eos_token_ids)
    final_scores_B = scores_B - c.reward.no_eos_penalty * (~has_eos_B)

    # 3. Score pass: policy log-probs (+ values), reference log-probs.
    t0 = time.perf_counter()
    prompt_BP, prompt_mask_BP = padding.left_pad(prompt_ids, P, self.tok.pad_id)
    mask_BM = np.arange(M)[None] < lengths_B[:, None]
    seq_BS = np.concatenate([prompt_BP, tokens_BM], axis=1)
    seq_mask_BS = np.concatenate([prompt_mask_BP, mask_BM], axis=1)
    host = {"inputs": seq_BS[:, :-1], "input_mask": seq_mask_BS[:, :-1],
            "targets": tokens_BM, "mask": mask_BM.astype(np.float32)}
    batch = {k: distributed.to_global(v, self.row_sh) for k, v in host.items()}
    scored = self._score(state.params, ref_params, batch)
    scored = _timed(timings, "score_pass_s", t0, scored)

    # 4. Rewards and advantages.
    t0 = time.perf_counter()
    data = {**batch, "old_logp": scored["logp"]}
    if self.critic:
      adv = self._advantages(jnp.asarray(final_scores_B), scored["logp"], scored["ref_logp"],
                             scored["values"], batch["mask"], jnp.float32(kl_coef))
      data.update(old_values=scored["values"], returns=adv["returns"])
    else:
      adv = self._advantages(jnp.asarray(final_scores_B), scored["logp"], scored["ref_logp"],
                             batch["mask"], jnp.float32(kl_coef))
    data["adv"] = adv["adv"]
    adv = _timed(timings, "advantages_s", t0, adv)

    # 5. Epochs over shuffled minibatches.
    t0 = time.perf_counter()
    data = {k: distributed.to_host(v) for k, v in data.items()}
    mb_size, step_metrics = c.train.minibatch_size, []
    for epoch in range(c.learner.epochs):
      order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), B))
      for start in range(0, B, mb_size):
        rows = np.sort(order[start:start + mb_size])
        mb = {k: distributed.to_global(v[rows], self.row_sh) for k, v in data.items()}
        state, m = self._step(state, mb, ref_params if self.lora else None)
        step_metrics.append(m)
    step_metrics = jax.device_get(step_metrics)
    _timed(timings, "update_s", t0, state.params)

    gap_BM = np.abs(sample_logp_BM - data["old_logp"]) * mask_BM
    n_tokens = max(mask_BM.sum(), 1)
    k1_B = np.asarray(adv["k1_B"])
    mean = lambda name: float(np.mean([m[name] for m in step_metrics]))
    metrics = {
        "reward": float(scores_B.mean()),
        "reward_with_penalty": float(final_scores_B.mean()),
        "kl": float(np.asarray(adv["kl_B"]).mean()),
        "kl_k1": float(k1_B.mean()),
        "kl_coef": float(kl_coef),
        "entropy": mean("ent"),
        "clip_frac": mean("clipped"),
        **({"value_loss": mean("vf")} if self.critic else
           {"group_reward_std": float(np.asarray(adv["group_std_Q"]).mean())}),
        "policy_loss": mean("pg"),
        "approx_kl_old": mean("approx_kl"),
        "grad_norm": mean("grad_norm"),
        "response_length": float(lengths_B.mean()),
        "no_eos_frac": float(1.0 - has_eos_B.mean()),
        "logprob_gap": float(gap_BM.sum() / n_tokens),
        "logprob_gap_max": float(gap_BM.max()),
        "finite": float(all(bool(m["finite"]) for m in step_metrics)),
        **getattr(self.reward_fn, "last", {}),  # each reward source's mean (`rl.reward`)
        **timings,
    }
    return state, metrics
