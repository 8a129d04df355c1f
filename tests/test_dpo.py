"""DPO with soft labels (rl/dpo.py): the loss and gradient against TRL's `DPOTrainer`,
p = 0.5 pushing nowhere at the reference, the response mask, and an 8-device mesh against
one device. The loss's closed form: test_losses.py; the stage: e2e/test_p7_dpo.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import distributed
from cai_jax.checkpoints import hf, load
from cai_jax.data import comparisons
from cai_jax.model import transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.rl import dpo
from cai_jax.training import optim
from cai_jax.configs import dpo as dpo_config
from test_preference_model import tiny_config as pairs_config


SEQ = 128  # the tiny pairs' conversations, system prompt included


def tiny_config(**train):
  return pairs_config(dpo_config, **train)


# --- Against TRL ------------------------------------------------------------------------------


def _pairs(tok, n, seed):
  rng = np.random.default_rng(seed)
  words = ["bread", "safe", "cannot", "help", "the", "fox", "lazy", "critique", "revise"]
  say = lambda k: " ".join(rng.choice(words, k))
  return [comparisons.Comparison(f"c{i}", "red_team", say(4), say(int(rng.integers(2, 9))),
                                 say(int(rng.integers(2, 9))), 1.0) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_pairs(tiny_model_dir):
  cfg, params, tok = load.load_model(tiny_model_dir)
  comps = _pairs(tok, 4, seed=0)
  data = comparisons.tokenize_pairs(tok, comps, SEQ, "error")
  return cfg, params, tok, comps, data


def test_loss_and_gradient_equal_trl_dpo_trainer(tiny_model_dir, tiny_pairs, tmp_path):
  """Hard labels: our loss and every parameter's gradient equal TRL's DPOTrainer
  (loss_type="sigmoid") on the same tiny models, token ids and beta. The policy is
  the reference plus noise, so every pair has its own non-zero margin."""
  torch = pytest.importorskip("torch")
  trl = pytest.importorskip("trl")
  datasets = pytest.importorskip("datasets")
  transformers = pytest.importorskip("transformers")
  from cai_jax.text.chat import prompt_response_ids
  cfg, ref_params, tok, comps, data = tiny_pairs
  beta = 0.5
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(ref_params))))
  params = jax.tree.map(lambda x: x + 0.05 * jnp.std(x) * jax.random.normal(next(keys), x.shape),
                        ref_params)
  policy_dir = str(tmp_path / "policy")
  hf.save_hf(params, cfg, policy_dir, tokenizer=tok)

  # TRL on transformers' copies of the models, the batch built by TRL's own collator
  # from the token ids of our one chat rule.
  load_hf = lambda path: transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32)
  hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  train = datasets.Dataset.from_dict({"prompt": [c.prompt for c in comps],
                                      "chosen": [c.response_a for c in comps],
                                      "rejected": [c.response_b for c in comps]})
  args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=["sigmoid"],
                       report_to="none", use_cpu=True, per_device_train_batch_size=4,
                       max_length=None, bf16=False)
  trainer = trl.DPOTrainer(model=load_hf(policy_dir), ref_model=load_hf(tiny_model_dir),
                           args=args, train_dataset=train, processing_class=hf_tok)
  examples = []
  for c in comps:
    prompt_ids, chosen = prompt_response_ids(tok, c.prompt, c.response_a)
    _, rejected = prompt_response_ids(tok, c.prompt, c.response_b)
    examples.append({"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected})
  inputs = trainer.data_collator(examples)
  model = trainer.model
  model.train()
  model.zero_grad()
  trl_loss = trainer.compute_loss(model, inputs)
  trl_loss.backward()
  trl_grads = hf.params_from_tensors(
      ((name, p.grad.detach().numpy()) for name, p in model.named_parameters()), cfg)

  # Ours.
  batch = comparisons.make_batch(data, np.arange(len(comps)), SEQ, with_responses=True)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  batch["ref_logp"] = dpo.response_logps(ref_params, batch["tokens"], batch["mask"],
                                         batch["response_mask"], cfg=cfg, sharder=None,
                                         chunk=16)

  def loss(p):
    total, stats = dpo.dpo_loss_fn(p, batch, cfg=cfg, sharder=None, beta=beta,
                                   loss_type="sigmoid", chunk=16)
    return total / stats["pairs"], stats

  (ours, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
  np.testing.assert_allclose(float(ours), float(trl_loss.detach()), rtol=1e-5)
  assert abs(float(ours) - np.log(2)) > 1e-3  # the margins are not 0
  assert float(stats["margin_sum"]) != 0.0
  flat_ours = jax.tree_util.tree_leaves_with_path(jax.device_get(grads))
  flat_trl = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(trl_grads)))
  assert len(flat_ours) == len(flat_trl)
  for path, g in flat_ours:
    want = np.asarray(flat_trl[path])
    assert np.abs(want).max() > 0, path
    np.testing.assert_allclose(np.asarray(g), want, rtol=2e-4,
                               atol=2e-6 * np.abs(want).max(), err_msg=str(path))


def test_half_labels_push_nowhere_at_the_reference(tiny_pairs):
  """p = 0.5 at policy = reference: dloss/dm = sigma(0) - 1/2 = 0, so no gradient;
  hard labels on the same pairs do move the policy."""
  cfg, params, _, comps, data = tiny_pairs
  batch = comparisons.make_batch(data, np.arange(len(comps)), SEQ, with_responses=True)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  batch["ref_logp"] = dpo.response_logps(params, batch["tokens"], batch["mask"],
                                         batch["response_mask"], cfg=cfg, sharder=None, chunk=16)

  def grad_norm(p_a):
    b = {**batch, "p_a": jnp.full_like(batch["p_a"], p_a)}
    g = jax.grad(lambda p: dpo.dpo_loss_fn(p, b, cfg=cfg, sharder=None, beta=0.1,
                                           loss_type="sigmoid", chunk=16)[0])(params)
    return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))

  hard = grad_norm(1.0)
  assert hard > 1e-3
  assert grad_norm(0.5) <= 1e-6 * hard


def test_response_mask_covers_the_response_and_end_of_turn(tiny_pairs):
  cfg, params, tok, comps, data = tiny_pairs
  from cai_jax.text.chat import prompt_response_ids
  batch = comparisons.make_batch(data, np.array([0, -1]), SEQ, with_responses=True)
  prompt_ids, response_ids = prompt_response_ids(tok, comps[0].prompt, comps[0].response_a)
  row = batch["response_mask"][0, 0]
  assert row.sum() == len(response_ids)
  assert np.array_equal(batch["tokens"][0, 0][row], response_ids)
  assert response_ids[-1] in tok.eos_ids
  assert not batch["response_mask"][1].any()  # a padding pair scores nothing
  # the summed log-prob is the sum of the response's next-token log-probs
  logits, _ = transformer.forward(params, jnp.asarray(batch["tokens"][:1, 0]), cfg)
  logp = jax.nn.log_softmax(jax.device_get(logits)[0], -1)
  start = len(prompt_ids)
  want = sum(float(logp[t - 1, batch["tokens"][0, 0, t]])
             for t in range(start, start + len(response_ids)))
  got = dpo.response_logps(params, jnp.asarray(batch["tokens"][:1]),
                           jnp.asarray(batch["mask"][:1]),
                           jnp.asarray(batch["response_mask"][:1]), cfg=cfg, sharder=None,
                           chunk=8)
  np.testing.assert_allclose(float(got[0, 0]), want, rtol=1e-5)


# --- On a mesh ---------------------------------------------------------------------------------


def _dpo_steps(sharder, cfg, params, batch_np, steps=3):
  """`steps` jitted DPO updates on `sharder`'s mesh; (state, losses)."""
  c = tiny_config()
  abstract = transformer.abstract_params(cfg)
  param_sh = transformer.param_shardings(cfg, sharder)
  tx, schedule = optim.make_optimizer(c.optim, steps, abstract)
  state_sh = optim.train_state_shardings(tx, abstract, param_sh, sharder)
  state = jax.jit(lambda p, k: optim.init_train_state(p, tx, k), out_shardings=state_sh)(
      jax.device_put(params, param_sh), jax.random.key(0))
  batch_sh = dpo.batch_shardings(sharder)
  step = jax.jit(functools.partial(dpo.train_step, cfg=cfg, tx=tx, schedule=schedule,
                                   sharder=sharder, microbatches=2, beta=0.5,
                                   loss_type="sigmoid", chunk=16),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharder.replicated))
  out = []
  for _ in range(steps):
    state, m = step(state, distributed.batch_to_global(batch_np, batch_sh))
    out.append(float(m["loss"]))
  return state, out


# All three mesh axes at once; each axis alone is tests/test_sft_step.py's (same rule table).
@pytest.mark.parametrize("shape", [(2, 2, 2)], ids=str)
def test_sharded_steps_equal_one_device(tiny_pairs, shape):
  """A (data, fsdp, tensor) = (2, 2, 2) mesh: 3 DPO updates equal one device."""
  cfg, params, _, comps, data = tiny_pairs
  rows = np.array([0, 1, 2, 3, -1, -1, -1, -1])  # padding pairs must add nothing
  batch = dpo.make_batch(data, np.zeros((data.size, 2), np.float32), rows, SEQ)
  batch["ref_logp"] = np.asarray(dpo.response_logps(
      params, *(jnp.asarray(batch[k]) for k in ("tokens", "mask", "response_mask")),
      cfg=cfg, sharder=None, chunk=16))
  batch["p_a"][:4] = [1.0, 0.0, 0.8, 0.3]
  single, l1 = _dpo_steps(Sharder(make_mesh((1, 1, 1), jax.devices()[:1])), cfg,
                          jax.device_get(params), batch)
  sharded, l8 = _dpo_steps(Sharder(make_mesh(shape)), cfg, jax.device_get(params), batch)
  assert len(sharded.params["layers"]["attn"]["q"].sharding.device_set) == 8
  assert l1[0] != l1[-1]  # the steps moved the policy
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # Adam divides by sqrt(v): for near-zero gradients it turns reduction-order noise
  # into lr-sized steps, so after 3 updates the params agree to ~2e-5 relative on
  # some CPUs (the losses above to 1e-5); a sharding bug is off by O(1).
  for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


# --- The step, not only the loss: soft labels reach the update ----------------------------------


def _dpo_update(cfg, params, batch, beta):
  """One `dpo.train_step` with SGD at lr 1: (the parameter update, the metrics)."""
  from test_preference_model import sgd_state, update_of
  state, tx, schedule = sgd_state(params)
  new_state, metrics = jax.jit(functools.partial(
      dpo.train_step, cfg=cfg, tx=tx, schedule=schedule, sharder=None, microbatches=1,
      beta=beta, loss_type="sigmoid", chunk=16))(state, batch)
  return update_of(state, new_state), metrics


def _dpo_batch(tiny_pairs, p, ref_shift=None):
  cfg, params, _, comps, data = tiny_pairs
  batch = comparisons.make_batch(data, np.arange(len(comps)), SEQ, with_responses=True)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  batch["p_a"] = jnp.full_like(batch["p_a"], p)
  logp = dpo.response_logps(params, batch["tokens"], batch["mask"], batch["response_mask"],
                            cfg=cfg, sharder=None, chunk=16)
  batch["ref_logp"] = logp if ref_shift is None else logp - ref_shift
  return batch


@pytest.mark.parametrize("p", [0.9, 0.7, 0.3])
def test_dpo_step_update_is_the_soft_label_closed_form(tiny_pairs, p):
  """One `dpo.train_step` with SGD at lr 1, the reference log-probs shifted so the margins
  m = beta (logratio_a - logratio_b) differ from 0: the update is minus
  mean_b (sigma(m_b) - p) beta (grad log pi(a_b) - grad log pi(b_b)) (written here)."""
  from test_preference_model import assert_trees_close
  cfg, params, *_ = tiny_pairs
  beta = 0.5
  shift = jnp.asarray(np.random.default_rng(1).normal(0, 3, (len(tiny_pairs[3]), 2)),
                      jnp.float32)
  batch = _dpo_batch(tiny_pairs, p, shift)
  update, metrics = _dpo_update(cfg, params, batch, beta)
  logp, vjp = jax.vjp(lambda q: dpo.response_logps(q, batch["tokens"], batch["mask"],
                                                   batch["response_mask"], cfg=cfg,
                                                   sharder=None, chunk=16), params)
  ratio = np.asarray(logp - batch["ref_logp"], np.float64)
  m = beta * (ratio[:, 0] - ratio[:, 1])
  w = (1 / (1 + np.exp(-m)) - p) * beta / len(m)
  (grad,) = vjp(jnp.asarray(np.stack([w, -w], axis=1), jnp.float32))
  assert_trees_close(update, jax.tree.map(lambda g: -np.asarray(g), grad), rtol=2e-3)
  loss = np.mean(p * np.logaddexp(0, -m) + (1 - p) * np.logaddexp(0, m))
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)


def test_dpo_step_at_the_reference_scales_with_half_minus_p(tiny_pairs):
  """At policy = reference every margin is 0, so the gradient is (1/2 - p) times one
  direction: the update at p = 0.8 is 0.6 times the update at p = 1, and at p = 0.3
  -0.4 times it."""
  cfg, params, *_ = tiny_pairs
  hard, _ = _dpo_update(cfg, params, _dpo_batch(tiny_pairs, 1.0), 0.5)
  for p, ratio in ((0.8, 0.6), (0.3, -0.4)):
    soft, _ = _dpo_update(cfg, params, _dpo_batch(tiny_pairs, p), 0.5)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(hard))
    for s, h in zip(jax.tree.leaves(soft), jax.tree.leaves(hard)):
      np.testing.assert_allclose(s, ratio * h, rtol=2e-3, atol=2e-3 * scale)
