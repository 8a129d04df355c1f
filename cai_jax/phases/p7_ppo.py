"""Stage 7 (RL-CAI): PPO against the preference model, with a KL penalty to SL-CAI.

Each iteration, in the paper's order:

  1. rollout   the policy samples a response to each prompt (jit sampler,
               temperature tau), recording the sampled tokens' log-probs;
  2. reward    the preference model scores [user prompt, assistant response]
               at its last token; a response with no end-of-turn token loses
               `reward.no_eos_penalty`;
  3. score     one jitted pass recomputes the policy's log-probs and values and
               the frozen reference's log-probs of the sampled tokens;
  4. GAE       r_t = -beta * kl_t + [t = last] * score (`rl.ppo.token_rewards`),
               optionally whitened, then GAE; advantages whitened;
  5. update    `ppo_epochs` passes over shuffled minibatches of the rollout:
               clipped policy loss + vf_coef * clipped value loss
               - ent_coef * entropy, token means over the minibatch;
  6. KL        beta is fixed (`kl.target` = 0) or moved towards the target
               KL per sequence (`rl.ppo.adaptive_kl_coef`).

The KL has one knob, `config.kl` (coefficient, estimator, target), and
enters only through the reward: there is no second KL loss term.

Critic: the value head sits on the policy's backbone (one model, params
`{"backbone", "head"}` like `model.heads`), not on a separate critic model.
A separate critic costs another model's params plus its two Adam moments
(3x params) and another forward+backward over every minibatch; sharing the
backbone makes step 3 one policy pass giving both log-probs and values and
step 5 one backward. The cost is that value-loss gradients also move the
policy's features (kept small by `vf_coef`), and the critic starts from the
LM rather than from the preference model.

Log-probs are computed from hidden states in chunks of T (`rl.ppo.token_logprobs`):
only the sampled tokens' log-probs and the entropy leave each chunk, never
[B, T, V] float32 logits; and only the response positions are unembedded.

The data position is the iteration; the prompt order is a function of
(seed, epoch), the sampling keys and minibatch orders come from the PRNG key
in the train state, and beta is saved with the data position: a resumed run
reproduces the uninterrupted run bit for bit.

Output, under `<workdir>/p7_ppo/`: `checkpoints/` (Orbax), `metrics.jsonl`,
`tensorboard/` and the final policy as a Hugging Face directory `hf/`.

  python -m cai_jax.phases.p7_ppo --config=configs/ppo.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from cai_jax import distributed, prompts
from cai_jax.checkpoints.load import load_model
from cai_jax.model import heads, transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.phases import cli, common, p1_prompts, p3_sft, p6_preference_model
from cai_jax.rl import ppo
from cai_jax.sampling.chat import encode_chat
from cai_jax.sampling.sampler import Sampler, SamplingParams, batch_bucket, sequence_keys
from cai_jax.tokenizer import Tokenizer
from cai_jax.training import checkpoint, optim
from cai_jax.training.metrics import MetricsWriter

OUT = "p7_ppo"

# reward_fn(prompt texts, response tokens [B, M], lengths [B]) -> scores [B] float32.
RewardFn = Callable[[Sequence[str], np.ndarray, np.ndarray], np.ndarray]


def output_dir(workdir: str) -> str:
  return os.path.join(workdir, OUT)


# --- Models: policy / reference, preference model -------------------------------------------


def policy_spec(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.model`, or the SL-CAI model `<workdir>/p3_sft/hf`, or the bundled SmolLM2."""
  if config.model:
    return config.model
  sft = os.path.join(p3_sft.output_dir(workdir), "hf")
  return sft if os.path.isdir(sft) else "smollm2-135m-instruct"


def load_reference(config: ml_collections.ConfigDict, workdir: str, sharder: Sharder,
                   key: jax.Array) -> tuple[ModelConfig, transformer.Params, Tokenizer]:
  """(cfg, frozen reference params, tokenizer); the policy starts as a copy."""
  spec = policy_spec(config, workdir)
  cfg, params, tok = load_model(spec, sharder, tokenizer=config.tokenizer, key=key,
                                **dict(config.model_overrides))
  logging.info("policy/reference %s: %s, %.1fM params", spec, cfg.family,
               cfg.num_params() / 1e6)
  return cfg, params, tok


def load_preference_model(config: ml_collections.ConfigDict, workdir: str,
                          sharder: Sharder, key: jax.Array):
  """(cfg, scalar-model params, tokenizer) of the PM.

  `reward_model`: "" -> stage 6's model in the workdir; a directory -> that
  stage-6 output; "random:<preset>" -> a random scalar model (smoke runs).
  """
  spec = config.reward_model
  if spec.startswith("random:"):
    bkey, hkey = jax.random.split(key)
    cfg, backbone, tok = load_model(spec, sharder, tokenizer=config.tokenizer, key=bkey,
                                    **dict(config.model_overrides))
    head = jax.device_put(heads.init_head(cfg, hkey), heads.head_shardings(cfg, sharder))
    return cfg, {"backbone": backbone, "head": head}, tok
  return p6_preference_model.restore_preference_model(spec or workdir, sharder)


def pm_reward_fn(pm_cfg: ModelConfig, pm_params, pm_tok: Tokenizer, policy_tok: Tokenizer,
                 sharder: Sharder, max_len: int) -> RewardFn:
  """Reward = PM score of the rendered [user prompt, assistant response] at its last token.

  The response is decoded with the policy's tokenizer and re-rendered with
  the PM's chat template (the two may differ); rows are right-padded to
  `max_len` (longer ones keep their last `max_len` tokens) so nothing recompiles.
  """
  row_sh = sharder.sharding(("batch", None))
  score = jax.jit(lambda p, ids, mask: heads.sequence_scores(p, ids, pm_cfg, mask_BT=mask,
                                                             sharder=sharder),
                  in_shardings=(heads.scalar_model_shardings(pm_cfg, sharder), row_sh,
                                row_sh), out_shardings=sharder.replicated)
  multiple = math_prod_batch(sharder)

  def reward(prompt_texts, tokens_BM, lengths_B):
    n = len(prompt_texts)
    B = -(-n // multiple) * multiple
    # Rendered exactly as the PM was trained (score read at the end-of-turn token).
    rows = [p6_preference_model.conversation_ids(
        pm_tok, p, policy_tok.decode(toks[:length], skip_special_tokens=True).strip()
    )[-max_len:] for p, toks, length in zip(prompt_texts, tokens_BM, lengths_B)]
    # Pad to a power-of-two bucket: few shapes, no padding to max_len every time.
    S = min(max_len, batch_bucket(max(len(r) for r in rows)))
    ids_BS = np.full((B, S), pm_tok.pad_id, np.int32)
    mask_BS = np.zeros((B, S), bool)
    for i, ids in enumerate(rows):
      ids_BS[i, :len(ids)], mask_BS[i, :len(ids)] = ids, True
    mask_BS[n:, 0] = True  # filler rows: one token, discarded
    out = score(pm_params, distributed.to_global(ids_BS, row_sh),
                distributed.to_global(mask_BS, row_sh))
    return np.asarray(distributed.to_host(out))[:n].astype(np.float32)

  return reward


def math_prod_batch(sharder: Sharder) -> int:
  """How many shards the batch axis is split over."""
  return int(np.prod([sharder.mesh.shape[a] for a in dict(sharder.rules)["batch"]]))


# --- Prompts and their order ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptSet:
  texts: list[str]
  ids: list[list[int]]  # chat-rendered generation prompts

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for ids in self.ids:
      h.update(np.asarray(ids, np.int32).tobytes() + b"|")
    return h.hexdigest()[:16]


def load_prompts(config: ml_collections.ConfigDict, workdir: str, tok: Tokenizer
                 ) -> PromptSet:
  """Red-team + helpful train prompts of stage 1, rendered; too-long ones dropped."""
  texts = []
  for kind in config.data.kinds:
    path = p1_prompts.output_path(workdir, kind, "train")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no {kind} prompts; run stage 1"
                              " (python -m cai_jax.phases.p1_prompts ...)")
    texts += [r.prompt for r in prompts.read_jsonl(path)]
  kept_texts, kept_ids = [], []
  for text in texts:
    ids = encode_chat(tok, [{"role": "user", "content": text}])
    if len(ids) <= config.data.max_prompt_len:
      kept_texts.append(text)
      kept_ids.append(ids)
  if len(kept_ids) < len(texts):
    logging.warning("dropped %d of %d prompts longer than data.max_prompt_len=%d tokens",
                    len(texts) - len(kept_ids), len(texts), config.data.max_prompt_len)
  if len(kept_ids) < config.rollout.batch_size:
    raise ValueError(f"{len(kept_ids)} usable prompts, fewer than rollout.batch_size="
                     f"{config.rollout.batch_size}")
  return PromptSet(kept_texts, kept_ids)


def prompt_rows(n_prompts: int, batch_size: int, seed: int, iteration: int) -> np.ndarray:
  """The prompt indices of `iteration`: epochs of seeded permutations, remainder dropped."""
  per_epoch = n_prompts // batch_size
  epoch, i = divmod(iteration, per_epoch)
  order = np.random.default_rng([seed, 3, epoch]).permutation(n_prompts)
  return order[i * batch_size:(i + 1) * batch_size]


def left_pad(ids: Sequence[Sequence[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(ids), length), pad_id, np.int32)
  mask = np.zeros((len(ids), length), bool)
  for i, p in enumerate(ids):
    tokens[i, length - len(p):], mask[i, length - len(p):] = p, True
  return tokens, mask


# --- Jitted passes ------------------------------------------------------------------------


def value_head(head, x_BTD: jax.Array) -> jax.Array:
  return jnp.einsum("BTD,D->BT", x_BTD.astype(jnp.float32),
                    head["w"].astype(jnp.float32)) + head["b"]


def response_hidden(backbone, batch, *, cfg: ModelConfig, sharder: Sharder | None,
                    prompt_len: int) -> jax.Array:
  """Hidden states [B, M, D] at the positions that predict the M response tokens."""
  x_BSD, _ = transformer.hidden_states(backbone, batch["inputs"], cfg,
                                       mask_BT=batch["input_mask"], sharder=sharder)
  return x_BSD[:, prompt_len - 1:]


def score_pass(policy, ref, batch, *, cfg: ModelConfig, sharder: Sharder | None,
               prompt_len: int, temperature: float, chunk: int) -> dict[str, jax.Array]:
  """Policy log-probs and values, reference log-probs of the sampled tokens (no grads)."""
  hidden = functools.partial(response_hidden, batch=batch, cfg=cfg, sharder=sharder,
                             prompt_len=prompt_len)
  x_BMD = hidden(policy["backbone"])
  unembed = lambda p: (lambda x: transformer.logits_from_hidden(p, x, cfg))
  logp_BM, _ = ppo.token_logprobs(x_BMD, unembed(policy["backbone"]), batch["targets"],
                                  temperature, chunk, with_entropy=False)
  values_BM = value_head(policy["head"], x_BMD)
  ref_logp_BM, _ = ppo.token_logprobs(hidden(ref), unembed(ref), batch["targets"],
                                      temperature, chunk, with_entropy=False)
  return {"logp": logp_BM, "values": values_BM, "ref_logp": ref_logp_BM}


def advantages(scores_B, logp_BM, ref_logp_BM, values_BM, mask_BM, kl_coef, *,
               estimator: str, gamma: float, lam: float, whiten_rewards: bool
               ) -> dict[str, jax.Array]:
  kl_BM = ppo.KL_ESTIMATORS[estimator](logp_BM, ref_logp_BM) * mask_BM
  rewards_BM = ppo.token_rewards(scores_B, kl_BM, mask_BM, kl_coef)
  if whiten_rewards:
    rewards_BM = ppo.whiten(rewards_BM, mask_BM, shift_mean=False)
  adv_BM, returns_BM = ppo.gae(rewards_BM, values_BM, mask_BM, gamma, lam)
  return {"adv": ppo.whiten(adv_BM, mask_BM), "returns": returns_BM,
          "kl_B": jnp.sum(kl_BM, axis=1),
          "k1_B": jnp.sum(ppo.kl_k1(logp_BM, ref_logp_BM) * mask_BM, axis=1)}


def ppo_loss_fn(params, mb, *, cfg: ModelConfig, sharder: Sharder | None, prompt_len: int,
                temperature: float, chunk: int, clip_eps: float, value_clip: float,
                vf_coef: float, ent_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(policy + vf_coef * value - ent_coef * entropy loss sums, stats) of one microbatch."""
  x_BMD = response_hidden(params["backbone"], mb, cfg=cfg, sharder=sharder,
                          prompt_len=prompt_len)
  unembed = lambda x: transformer.logits_from_hidden(params["backbone"], x, cfg)
  logp_BM, ent_BM = ppo.token_logprobs(x_BMD, unembed, mb["targets"], temperature, chunk)
  values_BM = value_head(params["head"], x_BMD)
  mask_BM = mb["mask"]
  pg, count = ppo.policy_loss(logp_BM, mb["old_logp"], mb["adv"], mask_BM, clip_eps)
  vf, _ = ppo.value_loss(values_BM, mb["old_values"], mb["returns"], mask_BM, value_clip)
  ent, _ = ppo.entropy_sum(ent_BM, mask_BM)
  clipped, _ = ppo.clipped_count(logp_BM, mb["old_logp"], mb["adv"], mask_BM, clip_eps)
  approx_kl = jnp.sum(jnp.where(mask_BM > 0, ppo.kl_k3(logp_BM, mb["old_logp"]), 0.0))
  total = pg + vf_coef * vf - ent_coef * ent
  return total, {"pg": pg, "vf": vf, "ent": ent, "clipped": clipped,
                 "approx_kl": approx_kl, "tokens": count}


def train_step(state: optim.TrainState, mb, *, tx: optax.GradientTransformation,
               microbatches: int, sharder: Sharder | None, **loss_kw
               ) -> tuple[optim.TrainState, dict[str, jax.Array]]:
  """One AdamW update on the token-mean PPO loss of a minibatch."""
  loss_fn = functools.partial(ppo_loss_fn, sharder=sharder, **loss_kw)
  grads, stats = optim.accumulate_gradients(loss_fn, state.params, mb, microbatches, sharder)
  count = jnp.maximum(stats["tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  new_state = optim.apply_gradients(state, grads, tx)
  finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p))
                                for p in jax.tree.leaves(new_state.params)]))
  metrics = {k: stats[k] / count for k in ("pg", "vf", "ent", "clipped", "approx_kl")}
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["finite"] = finite & jnp.isfinite(metrics["pg"]) & jnp.isfinite(metrics["vf"])
  return new_state, metrics


# --- The learner: one PPO iteration -------------------------------------------------------


def _timed(timings: dict[str, float], name: str, t0: float, value=None):
  jax.block_until_ready(value)
  timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
  return value


@dataclasses.dataclass
class Learner:
  """The jitted pieces of one PPO iteration, for one model, mesh and config."""

  config: ml_collections.ConfigDict
  cfg: ModelConfig
  tok: Tokenizer
  sharder: Sharder
  reward_fn: RewardFn
  tx: optax.GradientTransformation

  def __post_init__(self):
    c, cfg, sharder = self.config, self.cfg, self.sharder
    r = c.rollout
    if r.temperature <= 0:  # and no top-k / top-p: the sampler's log-probs are pi's
      raise ValueError(f"rollout.temperature={r.temperature}: PPO samples from the"
                       " policy, so it must be > 0")
    if r.batch_size % c.train.minibatch_size:
      raise ValueError(f"rollout.batch_size={r.batch_size} is not a multiple of"
                       f" train.minibatch_size={c.train.minibatch_size}")
    self.P, self.M = c.data.max_prompt_len, r.max_new_tokens
    self.sampler = Sampler(cfg, max_new_tokens=self.M, stop_ids=cfg.eos_token_ids,
                           pad_id=self.tok.pad_id, sharder=sharder, length_buckets=(self.P,))
    self.sampling = SamplingParams(temperature=float(r.temperature))
    abstract = {"backbone": transformer.abstract_params(cfg),
                "head": jax.eval_shape(lambda k: heads.init_head(cfg, k), jax.random.key(0))}
    self.param_sh = heads.scalar_model_shardings(cfg, sharder)
    self.state_sh = optim.train_state_shardings(self.tx, abstract, self.param_sh, sharder)
    ref_sh = transformer.param_shardings(cfg, sharder)
    row_sh = sharder.sharding(("batch", None))
    self.row_sh, self.vec_sh = row_sh, sharder.sharding(("batch",))
    common_kw = dict(cfg=cfg, sharder=sharder, prompt_len=self.P,
                     temperature=float(r.temperature), chunk=c.train.logits_chunk)
    self._score = jax.jit(functools.partial(score_pass, **common_kw),
                          in_shardings=(self.param_sh, ref_sh, row_sh),
                          out_shardings=row_sh)
    self._advantages = jax.jit(functools.partial(
        advantages, estimator=c.kl.estimator, gamma=c.ppo.gamma, lam=c.ppo.lam,
        whiten_rewards=c.ppo.whiten_rewards))
    self._step = jax.jit(
        functools.partial(train_step, tx=self.tx, microbatches=c.train.microbatches,
                          clip_eps=c.ppo.clip_eps, value_clip=c.ppo.value_clip,
                          vf_coef=c.ppo.vf_coef, ent_coef=c.ppo.ent_coef, **common_kw),
        in_shardings=(self.state_sh, row_sh), out_shardings=(self.state_sh,
                                                               sharder.replicated),
        donate_argnums=0)

  def iterate(self, state: optim.TrainState, ref_params, prompt_texts: Sequence[str],
              prompt_ids: Sequence[Sequence[int]], kl_coef: float
              ) -> tuple[optim.TrainState, dict[str, float]]:
    """Rollout, reward, score pass, GAE and the PPO updates; returns (state, metrics)."""
    c, P, M, B = self.config, self.P, self.M, len(prompt_ids)
    timings: dict[str, float] = {}
    key, rollout_key, shuffle_key = jax.random.split(state.key, 3)
    state = state.replace(key=key)

    # 1. Rollout.
    t0 = time.perf_counter()
    keys = sequence_keys(rollout_key, list(range(B)))
    out = self.sampler.generate(state.params["backbone"], prompt_ids, keys, self.sampling)
    tokens_BM, sample_logp_BM, lengths_B = (np.asarray(out.tokens), np.asarray(out.logprobs),
                                            np.asarray(out.lengths))
    _timed(timings, "rollout_s", t0)

    # 2. Reward.
    t0 = time.perf_counter()
    scores_B = np.asarray(self.reward_fn(prompt_texts, tokens_BM, lengths_B), np.float32)
    _timed(timings, "reward_s", t0)
    has_eos_B = np.isin(tokens_BM[np.arange(B), lengths_B - 1], self.cfg.eos_token_ids)
    final_scores_B = scores_B - c.reward.no_eos_penalty * (~has_eos_B)

    # 3. Score pass: policy log-probs + values, reference log-probs.
    t0 = time.perf_counter()
    prompt_BP, prompt_mask_BP = left_pad(prompt_ids, P, self.tok.pad_id)
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
    adv = self._advantages(jnp.asarray(final_scores_B), scored["logp"], scored["ref_logp"],
                           scored["values"], batch["mask"], jnp.float32(kl_coef))
    adv = _timed(timings, "gae_s", t0, adv)

    # 5. PPO epochs over shuffled minibatches.
    t0 = time.perf_counter()
    data = {**batch, "old_logp": scored["logp"], "old_values": scored["values"],
            "adv": adv["adv"], "returns": adv["returns"]}
    data = {k: distributed.to_host(v) for k, v in data.items()}
    mb_size, step_metrics = c.train.minibatch_size, []
    for epoch in range(c.ppo.epochs):
      order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), B))
      for start in range(0, B, mb_size):
        rows = np.sort(order[start:start + mb_size])
        mb = {k: distributed.to_global(v[rows], self.row_sh) for k, v in data.items()}
        state, m = self._step(state, mb)
        step_metrics.append(m)
    step_metrics = jax.device_get(step_metrics)
    _timed(timings, "update_s", t0, state.params)

    gap_BM = np.abs(sample_logp_BM - data["old_logp"]) * mask_BM
    n_tokens = max(mask_BM.sum(), 1)
    k1_B = np.asarray(adv["k1_B"])
    metrics = {
        "reward": float(scores_B.mean()),
        "reward_with_penalty": float(final_scores_B.mean()),
        "kl": float(np.asarray(adv["kl_B"]).mean()),
        "kl_k1": float(k1_B.mean()),
        "kl_coef": float(kl_coef),
        "entropy": float(np.mean([m["ent"] for m in step_metrics])),
        "clip_frac": float(np.mean([m["clipped"] for m in step_metrics])),
        "value_loss": float(np.mean([m["vf"] for m in step_metrics])),
        "policy_loss": float(np.mean([m["pg"] for m in step_metrics])),
        "approx_kl_old": float(np.mean([m["approx_kl"] for m in step_metrics])),
        "grad_norm": float(np.mean([m["grad_norm"] for m in step_metrics])),
        "response_length": float(lengths_B.mean()),
        "no_eos_frac": float(1.0 - has_eos_B.mean()),
        "logprob_gap": float(gap_BM.sum() / n_tokens),
        "logprob_gap_max": float(gap_BM.max()),
        "finite": float(all(bool(m["finite"]) for m in step_metrics)),
        **timings,
    }
    return state, metrics


# --- The run -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PPOResult:
  status: str  # "done" | "preempted"
  iteration: int
  metrics: dict[str, float]
  output_dir: str
  state: optim.TrainState | None = dataclasses.field(default=None, repr=False)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        reward_fn: RewardFn | None = None,
        should_stop: Callable[[int], bool] | None = None) -> PPOResult:
  """Train (or resume) PPO for `ppo.iterations` iterations.

  `reward_fn` replaces the preference model (tests: a programmatic reward).
  `should_stop(iteration)` is polled after every iteration, like SIGTERM: True
  saves a checkpoint and returns status "preempted". A non-finite loss or
  parameter raises FloatingPointError without saving.
  """
  out = output_dir(workdir)
  c = config
  key = jax.random.key(c.seed)
  model_key, head_key, state_key, pm_key = jax.random.split(key, 4)

  # --- Mesh, models, prompts ---
  sharder = common.sharder_from_config(c)
  cfg, ref_params, tok = load_reference(c, workdir, sharder, model_key)
  if reward_fn is None:
    pm_cfg, pm_params, pm_tok = load_preference_model(c, workdir, sharder, pm_key)
    reward_fn = pm_reward_fn(pm_cfg, pm_params, pm_tok, tok, sharder, c.reward.max_len)
  prompt_set = load_prompts(c, workdir, tok)
  iterations = c.ppo.iterations
  updates = iterations * c.ppo.epochs * (c.rollout.batch_size // c.train.minibatch_size)

  # --- Optimizer, state, checkpoints ---
  abstract = {"backbone": transformer.abstract_params(cfg),
              "head": jax.eval_shape(lambda k: heads.init_head(cfg, k), head_key)}
  tx, _ = optim.make_optimizer(c.optim, updates, abstract)
  learner = Learner(c, cfg, tok, sharder, reward_fn, tx)
  ckpt = checkpoint.Checkpointer(os.path.join(out, "checkpoints"),
                                 max_to_keep=c.train.keep_checkpoints)
  data_info = {"fingerprint": prompt_set.fingerprint(), "num_prompts": len(prompt_set.ids),
               "batch_size": c.rollout.batch_size, "seed": c.seed}
  # No donation: the policy starts as a copy, the reference stays as loaded.
  init = jax.jit(lambda p, hk, k: optim.init_train_state(
      {"backbone": p, "head": heads.init_head(cfg, hk)}, tx, k),
      out_shardings=learner.state_sh)
  state = checkpoint.restore_or_init(
      ckpt, optim.abstract_train_state(tx, abstract, learner.state_sh),
      lambda: init(ref_params, head_key, state_key), expect=data_info)
  start, kl_coef = 0, float(c.kl.coef)
  if ckpt.latest_step() is not None:
    saved = ckpt.restore_data()
    start, kl_coef = int(saved["iteration"]), float(saved["kl_coef"])

  # --- Iterations ---
  status, last = "done", {}
  with checkpoint.StopFlag() as stop, \
       MetricsWriter(out, resume_step=start) as writer, \
       tqdm(total=iterations, initial=start, desc="ppo", unit="iter",
            disable=jax.process_index() != 0) as bar:
    try:
      for it in range(start, iterations):
        rows = prompt_rows(len(prompt_set.ids), c.rollout.batch_size, c.seed, it)
        state, metrics = learner.iterate(state, ref_params,
                                         [prompt_set.texts[i] for i in rows],
                                         [prompt_set.ids[i] for i in rows], kl_coef)
        done = it + 1
        if not metrics.pop("finite") or not np.isfinite(metrics["policy_loss"]):
          raise FloatingPointError(
              f"non-finite loss or parameters at iteration {done}; stopped without"
              f" saving, the last checkpoint ({ckpt.latest_step()}) is kept")
        if c.kl.target:
          kl_coef = ppo.adaptive_kl_coef(kl_coef, metrics["kl"], c.kl.target,
                                         c.kl.horizon, c.rollout.batch_size)
        last = metrics
        writer.write(done, metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}")
        preempt = should_stop is not None and should_stop(done)
        preempt = preempt or stop.requested or ckpt.reached_preemption(done)
        if done % c.train.save_every == 0 or done == iterations or preempt:
          ckpt.save(state, {"iteration": done, "kl_coef": kl_coef, **data_info},
                    force=True)
        if preempt and done < iterations:
          status = "preempted"
          logging.warning("stopping at iteration %d (preemption); resume with the same"
                          " command", done)
          start = done
          break
      else:
        start = iterations
    finally:
      ckpt.wait_until_finished()
      ckpt.close()

  if status == "done":
    p3_sft.export_hf(state.params["backbone"], cfg, tok, os.path.join(out, "hf"), start)
  return PPOResult(status, start, last, out, state)


if __name__ == "__main__":
  cli.main(run)
