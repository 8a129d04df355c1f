"""The preference model's steps (preference/model.py): microbatches and sharding keep a
pair's members together, and PPO's reward equals the PM's training forward; and the
synthetic labelled pairs the PM and DPO tests share. Stage 6 end to end:
e2e/test_p6_preference_model.py."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import records
from cai_jax.checkpoints import load
from cai_jax.model import config as model_config
from cai_jax.model import heads, transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax import distributed
from cai_jax.data import comparisons
from cai_jax.preference import model as pm
from cai_jax.preference.scorer import Scorer
from cai_jax.rl.reward import pm_ids_reward_fn, pm_reward_fn, shares_tokenizer
from cai_jax.text.chat import generation_ids, user_turn
from cai_jax.training import optim
from cai_jax.configs import preference_model as pm_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "@"


def label_record(i: int, prompt: str, a: str, b: str, p_a: float, kind: str
                 ) -> records.LabelRecord:
  return records.LabelRecord(
      id=f"pair-{i}", prompt=prompt, kind=kind, response_a=a, response_b=b,
      mode="multiple_choice", models=("feedback",), principle_ids=("harm",),
      logprobs=((((-0.1, -2.3),),),), cot=(), model_p_a=(p_a,), p_a=p_a)


def marker_records(n: int, seed: int) -> list[records.LabelRecord]:
  """Random-text pairs where the response holding MARKER is preferred.

  The marked response is a or b at random, at a random position; its label
  is hard (1 / 0) or soft (0.9 / 0.1).
  """
  rng = np.random.default_rng(seed)
  letters = list("abcdefghijklmnop ")
  out = []
  for i in range(n):
    a, b = ("".join(rng.choice(letters, rng.integers(8, 20))) for _ in range(2))
    at = int(rng.integers(0, len(a) + 1))
    marked = a[:at] + MARKER + a[at:]
    strength = 1.0 if rng.random() < 0.5 else 0.9
    prompt = "".join(rng.choice(letters, 6))
    kind = "red_team" if i % 4 else "helpful"
    if rng.random() < 0.5:
      out.append(label_record(i, prompt, marked, b, strength, kind))
    else:
      out.append(label_record(i, prompt, b, marked, 1.0 - strength, kind))
  return out


def as_comparisons(recs) -> list[comparisons.Comparison]:
  return [comparisons.Comparison(r.id, r.kind, r.prompt, r.response_a, r.response_b, r.p_a)
          for r in recs]


def tiny_config(stage=pm_config, **train):
  """`stage`'s (the PM's, or DPO's) tiny config on 64-token pairs."""
  c = stage.get_config("tiny")
  c.data.seq_len = 64
  c.data.length_buckets = ()  # one shape: one compilation
  c.train.update(train)
  return c


def write_labels(workdir: str, recs) -> None:
  records.write_shard(os.path.join(workdir, "p5_ai_labels"), 0, recs)


def single_device_sharder() -> Sharder:
  return Sharder(make_mesh((1, 1, 1), jax.devices()[:1]))


@pytest.fixture(scope="module")
def tok():
  return load.byte_tokenizer()


# --- Pairs in batches -----------------------------------------------------------------------------


def test_microbatches_and_sharding_keep_pairs_together(tok):
  sharder = single_device_sharder()
  comps = as_comparisons(marker_records(8, seed=2))
  batch = comparisons.make_batch(comparisons.tokenize_pairs(tok, comps, 64, "truncate"),
                                 np.arange(8), 64)
  cfg, backbone = load.random_model("tiny_llama", tok, sharder, jax.random.key(0))
  params = {"backbone": backbone, "head": heads.init_head(cfg, jax.random.key(1))}
  params["head"]["w"] = params["head"]["w"] * 100  # rewards far from 0: differences show
  loss_fn = functools.partial(pm.pm_loss_fn, cfg=cfg, sharder=None)
  acc = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
  g1, s1 = acc(loss_fn, params, batch, 1)
  g4, s4 = acc(loss_fn, params, batch, 4)
  np.testing.assert_allclose(s4["loss_sum"], s1["loss_sum"], rtol=1e-5)
  assert s4["pairs"] == s1["pairs"] == 8
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Each pair's two rewards are the rewards of its two conversations alone.
  r_B2 = pm.pair_rewards(params, batch["tokens"], batch["mask"], cfg, None)
  alone = Scorer(cfg, params, tok, max_len=64, batch_size=2).score_texts(
      [comps[5].prompt] * 2, [comps[5].response_a, comps[5].response_b])
  np.testing.assert_allclose(r_B2[5], alone, rtol=1e-4, atol=1e-5)
  # On an 8-device mesh (pairs over data x fsdp) the rewards are the same.
  mesh = Sharder(make_mesh((2, 2, 2)))
  placed = jax.device_put(params, heads.scalar_model_shardings(cfg, mesh))
  sharded = jax.jit(functools.partial(pm.eval_step, cfg=cfg, sharder=mesh))(
      placed, distributed.batch_to_global(batch, comparisons.batch_shardings(mesh)))
  np.testing.assert_allclose(sharded, r_B2, rtol=1e-4, atol=1e-5)


# --- The one scorer ------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape,batch_size", [(None, None), (None, 3), ((2, 2, 2), None),
                                                   ((1, 8, 1), 5)], ids=str)
def test_ppo_reward_equals_the_pm_training_forward(tok, mesh_shape, batch_size):
  """The score PPO's reward gives a rollout (decode, re-render, one scorer) equals the
  PM-training forward (`pair_rewards` on a right-padded [B, 2, T] batch) on the same
  conversation, whatever the scorer's padding, batch size or mesh."""
  cfg = model_config.tiny_llama(vocab_size=tok.vocab_size, max_seq_len=256)
  params = {"backbone": transformer.init_params(cfg, jax.random.key(3)),
            "head": heads.init_head(cfg, jax.random.key(4))}
  params["head"]["w"] = params["head"]["w"] * 100.0  # scores far from 0: a mix-up shows
  comps = [dataclasses.replace(c, response_a=c.response_a.strip(),
                               response_b=c.response_b.strip())  # decoded rollouts are stripped
           for c in as_comparisons(marker_records(7, seed=9))]
  data = comparisons.tokenize_pairs(tok, comps, 96, "truncate")
  batch = comparisons.make_batch(data, np.arange(len(comps)), 96)  # every row padded to 96
  train_B2 = np.asarray(pm.pair_rewards(params, batch["tokens"], batch["mask"], cfg, None))

  sharder = None if mesh_shape is None else Sharder(make_mesh(mesh_shape))
  placed = params if sharder is None else jax.device_put(
      params, heads.scalar_model_shardings(cfg, sharder))
  scorer = Scorer(cfg, placed, tok, max_len=96, sharder=sharder, batch_size=batch_size)
  reward_fn = pm_reward_fn(scorer, tok)
  for j, response in ((0, "response_a"), (1, "response_b")):
    # What the policy samples: the response's tokens, then the end-of-turn token.
    rows = [tok.encode(getattr(c, response), add_bos=False) + [tok.token_id("<|im_end|>")]
            for c in comps]
    M = max(len(r) for r in rows) + 3  # rollouts are right-padded to max_new_tokens
    tokens_BM = np.full((len(rows), M), tok.pad_id, np.int32)
    for i, r in enumerate(rows):
      tokens_BM[i, :len(r)] = r
    lengths_B = np.asarray([len(r) for r in rows])
    rewards = reward_fn([c.prompt for c in comps], tokens_BM, lengths_B)
    np.testing.assert_allclose(rewards, train_B2[:, j], rtol=1e-5, atol=1e-5)
    # The device-side path (issue 13): the sampled ids after the prompt's ids, no
    # text round trip; equal on the same rollouts, and for rollouts cut before
    # their end-of-turn token (both paths append one).
    assert shares_tokenizer(tok, tok)
    prompts = [c.prompt for c in comps]
    ids_fn = pm_ids_reward_fn(scorer, {p: generation_ids(tok, user_turn(p)) for p in prompts})
    np.testing.assert_allclose(ids_fn(prompts, tokens_BM, lengths_B), train_B2[:, j],
                               rtol=1e-5, atol=1e-5)
    # (Where the cut leaves trailing whitespace the text path strips it and scores
    # other ids: the ids path scores exactly what was sampled; those rows are left out.)
    cut_B = lengths_B - 2
    same = np.array([tok.decode(t[:n]) == tok.decode(t[:n]).strip()
                     for t, n in zip(tokens_BM, cut_B)])
    assert same.sum() >= 4
    np.testing.assert_allclose(ids_fn(prompts, tokens_BM, cut_B)[same],
                               reward_fn(prompts, tokens_BM, cut_B)[same], rtol=1e-5, atol=1e-5)


# --- The step, not only the loss: soft labels reach the update ----------------------------------


def sgd_state(params):
  """A train state whose optimizer is plain SGD at lr 1: an update is minus the gradient."""
  import optax
  tx = optax.sgd(1.0)
  return optim.init_train_state(params, tx, jax.random.key(0)), tx, optax.constant_schedule(1.0)


def update_of(state, new_state):
  return jax.tree.map(lambda new, old: np.asarray(new, np.float64) - np.asarray(old, np.float64),
                      new_state.params, state.params)


def assert_trees_close(got, want, rtol):
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("p", [0.9, 0.7, 0.3])
def test_pm_step_update_is_the_soft_label_closed_form(tok, p):
  """One `pm.train_step` with SGD at lr 1 on 4 pairs labelled p: the update is minus
  mean_b (sigma(d_b) - p) (grad r_a - grad r_b), d = r_a - r_b (the Bradley-Terry
  gradient, written here); the logged loss is mean_b p softplus(-d) + (1 - p) softplus(d).
  A step that rounded p to 0 or 1 moves by sigma(d) - 1 instead."""
  comps = as_comparisons(marker_records(4, seed=3))
  batch = comparisons.make_batch(comparisons.tokenize_pairs(tok, comps, 64, "truncate"),
                                 np.arange(4), 64)
  batch["p_a"] = np.full_like(batch["p_a"], p)
  cfg, backbone = load.random_model("tiny_llama", tok, None, jax.random.key(4))
  head = heads.init_head(cfg, jax.random.key(5))
  params = {"backbone": backbone, "head": {**head, "w": head["w"] * 30}}  # d of order 1
  state, tx, schedule = sgd_state(params)
  new_state, metrics = jax.jit(functools.partial(
      pm.train_step, cfg=cfg, tx=tx, schedule=schedule, sharder=None, microbatches=1))(
          state, batch)
  r_B2, vjp = jax.vjp(lambda q: pm.pair_rewards(q, batch["tokens"], batch["mask"], cfg, None),
                      params)
  d = np.asarray(r_B2[:, 0] - r_B2[:, 1], np.float64)
  assert np.ptp(d) > 0.1  # pairs far enough apart for the label's weight to matter
  w = 1 / (1 + np.exp(-d)) - p
  (grad,) = vjp(jnp.asarray(np.stack([w, -w], axis=1) / 4, jnp.float32))
  assert_trees_close(update_of(state, new_state), jax.tree.map(lambda g: -np.asarray(g), grad),
                     rtol=2e-3)
  loss = np.mean(p * np.logaddexp(0, -d) + (1 - p) * np.logaddexp(0, d))
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
