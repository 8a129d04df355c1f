"""DPO with soft labels (stage 7's alternative): the loss against its closed form
and against TRL's `DPOTrainer`, p = 0.5 pushing nowhere at the reference, the
stage learning a synthetic preference, exact resume, and an 8-device mesh
against one device."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import distributed, paths
from cai_jax.checkpoints import hf, load
from cai_jax.data import comparisons
from cai_jax.model import transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.phases import p7_dpo
from cai_jax.rl import dpo
from cai_jax.training import losses, optim
from cai_jax.training.metrics import read_metrics
from cai_jax.configs import dpo as dpo_config
from test_preference_model import as_comparisons, marker_records, write_labels
from resume_helpers import assert_same_state, sigterm_at


SEQ = 128  # the tiny pairs' conversations, system prompt included


def softplus(x):
  return np.logaddexp(0.0, x)


def tiny_config(**train):
  c = dpo_config.get_config("tiny")
  c.data.seq_len = 64
  c.data.length_buckets = ()  # one shape: one compilation
  c.train.update(train)
  return c


# --- The loss ----------------------------------------------------------------------------------


def test_soft_sigmoid_loss_matches_closed_form_and_gradient():
  rng = np.random.default_rng(0)
  la, lb = rng.normal(0, 3, 64), rng.normal(0, 3, 64)
  p = rng.uniform(0, 1, 64)
  p[:8] = 1.0
  p[8:16] = 0.0
  beta = 0.3
  total, count = losses.dpo_loss(jnp.asarray(la), jnp.asarray(lb), jnp.asarray(p), beta)
  m = beta * (la - lb)
  want = p * softplus(-m) + (1 - p) * softplus(m)
  np.testing.assert_allclose(float(total), want.sum(), rtol=1e-5)
  assert float(count) == 64
  # p = 1: standard DPO, -log sigma(m)
  np.testing.assert_allclose(want[:8], -np.log(1 / (1 + np.exp(-m[:8]))), rtol=1e-5)
  grad_a = jax.grad(lambda x: losses.dpo_loss(x, jnp.asarray(lb), jnp.asarray(p), beta)[0])(
      jnp.asarray(la, jnp.float32))
  np.testing.assert_allclose(np.asarray(grad_a), beta * (1 / (1 + np.exp(-m)) - p),
                             rtol=1e-4, atol=1e-6)
  # masked pairs add nothing
  mask = np.arange(64) < 40
  t2, c2 = losses.dpo_loss(jnp.asarray(la), jnp.asarray(lb), jnp.asarray(p), beta,
                           mask_B=jnp.asarray(mask))
  np.testing.assert_allclose(float(t2), want[:40].sum(), rtol=1e-5)
  assert float(c2) == 40


def test_soft_ipo_matches_closed_form():
  rng = np.random.default_rng(1)
  la, lb = rng.normal(0, 3, 32), rng.normal(0, 3, 32)
  na, nb = rng.integers(1, 30, 32), rng.integers(1, 30, 32)
  p = rng.uniform(0, 1, 32)
  p[:4] = 1.0
  beta = 0.2
  total, _ = losses.dpo_loss(*(jnp.asarray(x) for x in (la, lb, p)), beta, "ipo",
                             response_len_a_B=jnp.asarray(na), response_len_b_B=jnp.asarray(nb))
  h = la / na - lb / nb
  want = (h - (2 * p - 1) / (2 * beta)) ** 2
  np.testing.assert_allclose(float(total), want.sum(), rtol=1e-5)
  # p = 1 is TRL's IPO, (h - 1 / (2 beta))^2; the soft loss is the p-mixture of the
  # two hard losses up to a constant in h.
  np.testing.assert_allclose(want[:4], (h[:4] - 1 / (2 * beta)) ** 2, rtol=1e-5)
  mix = p * (h - 1 / (2 * beta)) ** 2 + (1 - p) * (-h - 1 / (2 * beta)) ** 2
  const = mix - want
  np.testing.assert_allclose(const, 1 / (4 * beta ** 2) - ((2 * p - 1) / (2 * beta)) ** 2,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="loss_type"):
    losses.dpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), 0.1, "kto")


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


# --- The stage ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_learns_a_synthetic_preference(tmp_path):
  """Responses holding MARKER are preferred: the held-out margin's sign agrees with
  the label on > 90% of pairs, from chance."""
  write_labels(str(tmp_path), marker_records(400, seed=4))
  c = tiny_config(num_steps=60, batch_size=16, eval_batch_size=16, eval_every=60,
                  save_every=60, log_every=20)
  c.data.eval_size = 48
  c.dpo.beta = 0.5
  c.optim.update(lr=2e-3, warmup_steps=5)
  result = p7_dpo.run(c, str(tmp_path))
  first = read_metrics(result.output_dir)[0]
  print(f"\nmarker DPO: held-out accuracy {first['eval_accuracy']:.3f} ->"
        f" {result.metrics['eval_accuracy']:.3f}, margin {result.metrics['eval_margin']:.3f}")
  assert result.status == "done" and result.step == 60
  assert first["step"] == 0 and first["eval_accuracy"] < 0.75
  assert result.metrics["eval_accuracy"] > 0.9, result.metrics
  assert result.metrics["eval_margin"] > 0
  assert os.path.isdir(paths.hf_export(str(tmp_path), paths.DPO))


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


# All three mesh axes at once; each axis alone is tests/test_sft.py's (same rule table).
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


def test_bad_config_names_the_field(tmp_path):
  write_labels(str(tmp_path), marker_records(20, seed=7))
  c = tiny_config()
  c.dpo.loss_type = "kto"
  with pytest.raises(ValueError, match="dpo.loss_type"):
    p7_dpo.run(c, str(tmp_path))
  c = tiny_config()
  c.dpo.beta = 0.0
  with pytest.raises(ValueError, match="dpo.beta"):
    p7_dpo.run(c, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no AI label records"):
    p7_dpo.run(tiny_config(), str(tmp_path / "empty"))


def test_lora_dpo_trains_adapters_on_the_reference_resumes_and_exports_merged(tmp_path):
  """LoRA DPO: the state is the adapters alone; at step 0 the policy is the reference
  (log-ratio exactly 0); SIGTERM resume is bit-identical; `hf/` is the base with the
  adapters merged in; a checkpoint of rank 4 resumes as no other rank."""
  from cai_jax.model import lora
  for name in ("full", "resumed"):
    write_labels(str(tmp_path / name), marker_records(40, seed=5))
  config = tiny_config(num_steps=6, save_every=100, eval_every=3)
  config.lora.rank, config.lora.alpha = 4, 8.0
  config.optim.lr = 1e-2
  full = p7_dpo.run(config, str(tmp_path / "full"))
  assert full.status == "done" and full.step == 6
  assert set(full.state.params) == {"layers"}  # adapters only, and their moments
  assert jax.tree.structure(full.state.opt_state[1][0].mu) == jax.tree.structure(
      full.state.params)
  first = read_metrics(full.output_dir)[0]
  # B = 0: the policy is the reference (to float rounding: another jitted program) ...
  assert first["step"] == 0 and abs(first["eval_logratio"]) < 1e-4
  assert abs(full.metrics["eval_logratio"]) > 1e-3  # ... and then it moved

  kill_at_3 = sigterm_at(3)

  assert p7_dpo.run(config, str(tmp_path / "resumed"), should_stop=kill_at_3).step == 3
  resumed = p7_dpo.run(config, str(tmp_path / "resumed"))
  assert resumed.status == "done" and resumed.step == 6
  assert_same_state(full.state, resumed.state, ("params", "opt_state"))
  # The export is the adapted policy as an ordinary checkpoint.
  cfg, base, tok = load.load_model(config.model, None, tokenizer="bytes",
                                   key=jax.random.split(jax.random.key(config.seed))[0],
                                   **dict(config.model_overrides))
  cfg2, exported = hf.load_hf(paths.hf_export(str(tmp_path / "full"), paths.DPO))
  data = comparisons.tokenize_pairs(tok, as_comparisons(marker_records(40, seed=5)[:4]), 64,
                                    "truncate")
  batch = comparisons.make_batch(data, np.arange(4), 64, with_responses=True)
  args = [jnp.asarray(batch[k]) for k in ("tokens", "mask", "response_mask")]
  adapted = lora.attach(base, full.state.params, lora.LoraSpec.from_config(config.lora))
  want = dpo.response_logps(adapted, *args, cfg=cfg, sharder=None, chunk=16)
  got = dpo.response_logps(exported, *args, cfg=cfg2, sharder=None, chunk=16)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
  ref = dpo.response_logps(base, *args, cfg=cfg, sharder=None, chunk=16)
  assert float(np.abs(np.asarray(want) - np.asarray(ref)).max()) > 1e-3
  # A checkpoint of rank-4 adapters resumes neither as rank 8 nor as full fine-tuning.
  write_labels(str(tmp_path / "other"), marker_records(40, seed=5))
  p7_dpo.run(config, str(tmp_path / "other"), should_stop=kill_at_3)
  for rank in (8, 0):
    config.lora.rank = rank
    with pytest.raises(Exception, match="does not fit this run|other data"):
      p7_dpo.run(config, str(tmp_path / "other"))
