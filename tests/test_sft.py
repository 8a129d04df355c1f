"""SL-CAI SFT: loss masking, chunked loss, memorisation, exact resume, sharding,
the phase binary end to end, and the shared training infrastructure."""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cai_jax import paths, records
from cai_jax.checkpoints import hf
from cai_jax.model import config as model_config
from cai_jax.model import transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.checkpoints import load
from cai_jax import distributed
from cai_jax.data import sft as sft_data
from cai_jax.phases import p3_sft
from cai_jax.text.chat import prompt_response_ids
from cai_jax.text.tokenizer import Tokenizer
from cai_jax.training import sft_step
from cai_jax.records import CritiqueRevisionRecord, RevisionRound
from cai_jax.training import checkpoint, losses, optim
from cai_jax.training.metrics import read_metrics
from cai_jax.faults import damage
from cai_jax.configs import sft as sft_config
from resume_helpers import tree_hashes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_records(n_red: int = 10, n_help: int = 4) -> list[CritiqueRevisionRecord]:
  out = []
  for i in range(n_red):
    out.append(CritiqueRevisionRecord(
        id=f"red-{i}", prompt=f"How do I pick lock {i}?", kind="red_team", source="test",
        initial_response=f"Use a tension wrench on lock {i}.",
        rounds=(RevisionRound("p0", "Helps burglary.", f"I won't explain lock {i}."),
                RevisionRound("p1", "Say why.", f"Sorry, lock {i} is not mine to open.")),
        mode="critique"))
  for i in range(n_help):
    out.append(CritiqueRevisionRecord(
        id=f"help-{i}", prompt=f"What is {i} plus {i}?", kind="helpful", source="test",
        initial_response=f"{i} plus {i} is {2 * i}.", rounds=(), mode="critique"))
  return out


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("records"))
  records.write_shard(path, 0, make_records())
  return path


@pytest.fixture(scope="module")
def tok():
  return load.byte_tokenizer()


def tiny_config(records_dir: str, **train):
  c = sft_config.get_config("tiny")
  c.data.records_dir = records_dir
  c.data.length_buckets = ()  # one shape: one compilation
  c.train.loss_chunk = 32
  c.train.update(train)
  return c


def single_device_sharder() -> Sharder:
  return Sharder(make_mesh((1, 1, 1), jax.devices()[:1]))


def tiny_batch(tok, n: int = 8, seq_len: int = 128):
  examples = sft_data.build_examples(make_records(), -1, None, seed=0)[:n]
  data = sft_data.tokenize_examples(tok, examples, seq_len, "truncate")
  return data, sft_data.make_batch(data, np.arange(n), seq_len, tok.pad_id)


def tiny_model(tok, sharder, seed: int = 0):
  return load.random_model("tiny_llama", tok, sharder, jax.random.key(seed))


# --- Examples and masks ---------------------------------------------------------------------


def test_mix_follows_helpful_ratio():
  recs = make_records(n_red=30, n_help=30)
  ex = sft_data.build_examples(recs, -1, 0.25, seed=0)
  kinds = [e.kind for e in ex]
  assert kinds.count("red_team") == 30 and kinds.count("helpful") == 10
  assert ex == sft_data.build_examples(recs, -1, 0.25, seed=0)  # deterministic
  assert ex != sft_data.build_examples(recs, -1, 0.25, seed=1)
  red = {e.id: e.response for e in ex if e.kind == "red_team"}
  assert red["red-3"] == "Sorry, lock 3 is not mine to open."  # the final revision
  first = sft_data.build_examples(recs, 1, 0.0, seed=0)
  assert {e.response for e in first} == {f"I won't explain lock {i}." for i in range(30)}


def test_mix_keeps_everything_when_one_side_is_empty():
  # Nothing to mix in: keep the side there is (before the shared
  # data.batching.mix_by_ratio, SFT dropped every example here).
  only_red = sft_data.build_examples(make_records(n_red=12, n_help=0), -1, 0.27, seed=0)
  assert [e.kind for e in only_red] == ["red_team"] * 12
  only_help = sft_data.build_examples(make_records(n_red=0, n_help=5), -1, 0.27, seed=0)
  assert [e.kind for e in only_help] == ["helpful"] * 5


def test_loss_mask_covers_response_and_end_token_only(tok):
  data, batch = tiny_batch(tok, n=2)
  ex = sft_data.build_examples(make_records(), -1, None, seed=0)[0]
  prompt_ids, response_ids = prompt_response_ids(tok, ex.prompt, ex.response)
  assert response_ids[-1] == tok.token_id("<|im_end|>")
  assert tok.decode(response_ids) == ex.response
  targets = batch["targets"][0][batch["loss_mask"][0]]
  assert targets.tolist() == response_ids
  assert batch["inputs"][0][:len(prompt_ids)].tolist() == prompt_ids


def test_prompt_labels_do_not_change_the_loss(tok):
  sharder = single_device_sharder()
  cfg, params = tiny_model(tok, sharder)
  _, batch = tiny_batch(tok)
  loss_fn = jax.jit(jax.value_and_grad(functools.partial(
      sft_step.sft_loss_fn, cfg=cfg, sharder=None, loss_chunk=0), has_aux=True))
  (loss, stats), grads = loss_fn(params, batch)
  scrambled = dict(batch)
  rng = np.random.default_rng(0)
  noise = rng.integers(0, cfg.vocab_size, batch["targets"].shape).astype(np.int32)
  scrambled["targets"] = np.where(batch["loss_mask"], batch["targets"], noise)
  assert (scrambled["targets"] != batch["targets"]).any()
  (loss2, stats2), grads2 = loss_fn(params, scrambled)
  assert float(loss) == float(loss2)
  assert float(stats["loss_tokens"]) == float(batch["loss_mask"].sum())
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_array_equal(a, b)
  # ...while a response label does change it.
  changed = dict(batch)
  changed["targets"] = np.where(batch["loss_mask"], noise, batch["targets"])
  assert float(loss_fn(params, changed)[0][0]) != float(loss)


@pytest.mark.parametrize("chunk", [24, 32])
def test_chunked_loss_equals_plain(tok, chunk):
  sharder = single_device_sharder()
  cfg, params = tiny_model(tok, sharder)
  _, batch = tiny_batch(tok)

  def loss(params, chunk):
    s, c = sft_step.sft_loss_fn(params, batch, cfg=cfg, sharder=None, loss_chunk=chunk)
    return s / c["loss_tokens"]

  plain, g_plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
  chunked, g_chunked = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunk)
  np.testing.assert_allclose(chunked, plain, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sft_loss_is_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  mask = rng.integers(0, 2, (2, 5)).astype(bool)
  s, c = losses.sft_loss(logits, targets, mask)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  nll = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
  np.testing.assert_allclose(s, (nll * mask).sum(), rtol=1e-5)
  assert c == mask.sum()


# --- Optimizer and train step ----------------------------------------------------------------


def test_decay_mask_skips_norms_and_biases():
  cfg = model_config.tiny_qwen2()
  mask = optim.decay_mask(transformer.abstract_params(cfg))
  assert mask["embed"] and mask["layers"]["attn"]["q"] and mask["layers"]["mlp"]["up"]
  assert not mask["final_norm"] and not mask["layers"]["attn_norm"]
  assert not mask["layers"]["attn"]["q_bias"]


def test_microbatches_equal_one_big_batch(tok):
  sharder = single_device_sharder()
  cfg, params = tiny_model(tok, sharder)
  _, batch = tiny_batch(tok)
  loss_fn = functools.partial(sft_step.sft_loss_fn, cfg=cfg, sharder=None, loss_chunk=0)
  acc = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
  g1, s1 = acc(loss_fn, params, batch, 1)
  g4, s4 = acc(loss_fn, params, batch, 4)
  np.testing.assert_allclose(s4["loss_sum"], s1["loss_sum"], rtol=1e-6)
  assert s4["loss_tokens"] == s1["loss_tokens"]
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _train(tok, sharder, steps: int, lr: float, batch_np, microbatches: int = 1):
  """`steps` jitted SFT steps on one fixed batch; returns (state, losses)."""
  cfg, params = tiny_model(tok, sharder)
  c = sft_config.get_config("tiny").optim
  c.lr, c.warmup_steps, c.decay = lr, 0, "constant"
  abstract = transformer.abstract_params(cfg)
  param_sh = transformer.param_shardings(cfg, sharder)
  tx, schedule = optim.make_optimizer(c, steps, abstract)
  state_sh = optim.train_state_shardings(tx, abstract, param_sh, sharder)
  state = jax.jit(lambda p, k: optim.init_train_state(p, tx, k),
                  out_shardings=state_sh)(params, jax.random.key(1))
  batch_sh = sharder.sharding(("batch", "seq"))
  step = jax.jit(functools.partial(
      sft_step.train_step, cfg=cfg, tx=tx, schedule=schedule, sharder=sharder,
      microbatches=microbatches, loss_chunk=16),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharder.replicated))
  batch = distributed.batch_to_global(batch_np, batch_sh)
  out = []
  for _ in range(steps):
    state, m = step(state, batch)
    out.append(float(m["loss"]))
  return state, out


def test_sft_memorises_a_small_set(tok):
  _, batch = tiny_batch(tok)
  _, loss = _train(tok, single_device_sharder(), steps=60, lr=1e-2, batch_np=batch)
  assert loss[-1] < 0.1 * loss[0], loss[::10]


@pytest.fixture(scope="module")
def single_device_run(tok):
  """3 SFT steps on one device: the reference every mesh is compared with (run once)."""
  _, batch = tiny_batch(tok)
  return batch, _train(tok, single_device_sharder(), 3, 1e-3, batch)


# FSDP alone, tensor parallelism alone, and all three axes at once (data x fsdp x
# tensor); the data axis alone adds no code path the mixed mesh does not take.
@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 1, 8), (2, 2, 2)], ids=str)
def test_sharded_step_equals_single_device(tok, shape, single_device_run):
  """(data, fsdp, tensor) meshes on 8 devices: 3 SFT steps equal one device."""
  batch, (single, l1) = single_device_run
  sharder = Sharder(make_mesh(shape))
  sharded, l8 = _train(tok, sharder, 3, 1e-3, batch, microbatches=2)
  q = sharded.params["layers"]["attn"]["q"]
  assert len(q.sharding.device_set) == 8
  assert not q.sharding.is_fully_replicated
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


# --- Checkpoints --------------------------------------------------------------------------------


def test_checkpoint_restores_onto_another_mesh(tmp_path, tok):
  a, b = Sharder(make_mesh((1, 8, 1))), Sharder(make_mesh((2, 2, 2)))
  cfg, params = tiny_model(tok, a)
  c = sft_config.get_config("tiny").optim
  abstract = transformer.abstract_params(cfg)
  tx, _ = optim.make_optimizer(c, 10, abstract)
  state = optim.init_train_state(params, tx, jax.random.key(7))
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(state, {"epoch": 0, "step": 0}, force=True)
  shardings = optim.train_state_shardings(
      tx, abstract, transformer.param_shardings(cfg, b), b)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    restored, data = ckpt.restore(optim.abstract_train_state(tx, abstract, shardings))
  assert data == {"epoch": 0, "step": 0}
  assert tree_hashes(restored.params) == tree_hashes(params)
  assert tree_hashes(restored.opt_state) == tree_hashes(state.opt_state)
  np.testing.assert_array_equal(jax.random.key_data(restored.key),
                                jax.random.key_data(state.key))
  q = restored.params["layers"]["attn"]["q"]
  assert q.sharding == transformer.param_shardings(cfg, b)["layers"]["attn"]["q"]
  only = checkpoint.restore_params(str(tmp_path), jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
      transformer.param_shardings(cfg, b)))
  assert tree_hashes(only) == tree_hashes(params)


def test_stop_flag_catches_sigterm():
  with checkpoint.StopFlag() as flag:
    assert not flag.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested and flag.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, records_dir):
  config = tiny_config(records_dir, num_steps=2, save_every=1, eval_every=100)
  assert p3_sft.run(config, str(tmp_path)).step == 2
  # Resume with a NaN learning rate: step 3's update makes every parameter NaN.
  config.train.num_steps = 6
  config.optim.update(lr=float("nan"), warmup_steps=0, decay="constant")
  with pytest.raises(FloatingPointError, match="non-finite loss or parameters at step 3"):
    p3_sft.run(config, str(tmp_path))
  out = paths.stage_dir(str(tmp_path), paths.SFT)
  with checkpoint.Checkpointer(os.path.join(out, "checkpoints")) as ckpt:
    assert ckpt.latest_step() == 2
  assert max(m["step"] for m in read_metrics(out)) == 2


def test_damaged_newest_checkpoint_falls_back_to_identical_weights(tmp_path, records_dir,
                                                                   caplog):
  config = tiny_config(records_dir, num_steps=6, save_every=2, eval_every=100)
  full = p3_sft.run(config, str(tmp_path / "full"))
  part = p3_sft.run(config, str(tmp_path / "damaged"), should_stop=lambda step: step == 4)
  assert part.status == "preempted" and part.step == 4
  ckpt_dir = os.path.join(part.output_dir, "checkpoints")
  assert os.path.exists(os.path.join(ckpt_dir, "4", checkpoint.CHECKSUMS))
  damage(os.path.join(ckpt_dir, "4"))
  with caplog.at_level("WARNING"):
    resumed = p3_sft.run(config, str(tmp_path / "damaged"))
  assert resumed.status == "done" and resumed.step == 6
  warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
  assert any("step 4 is damaged" in w and "SHA-256" in w for w in warned), warned
  assert any("resuming from step 2" in w for w in warned), warned
  assert os.path.isdir(ckpt_dir + ".damaged/4")
  for name in ("params", "opt_state"):
    assert tree_hashes(getattr(full.state, name)) == tree_hashes(getattr(resumed.state, name))


def test_unsealed_checkpoint_that_fails_to_restore_is_skipped(tmp_path, tok):
  cfg, params = tiny_model(tok, single_device_sharder())
  c = sft_config.get_config("tiny").optim
  abstract = transformer.abstract_params(cfg)
  tx, _ = optim.make_optimizer(c, 10, abstract)
  state = optim.init_train_state(params, tx, jax.random.key(7))
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    for step in (1, 2):
      ckpt.save(dataclasses.replace(state, step=np.int32(step)), {"n": step}, force=True)
  os.remove(os.path.join(tmp_path, "2", checkpoint.CHECKSUMS))  # killed before its seal
  for r, _, fs in os.walk(os.path.join(tmp_path, "2", "params")):
    for f in fs:
      open(os.path.join(r, f), "wb").close()  # and then truncated
  shardings = optim.train_state_shardings(tx, abstract, transformer.param_shardings(
      cfg, single_device_sharder()), single_device_sharder())
  target = optim.abstract_train_state(tx, abstract, shardings)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 2 and not ckpt.verified(2)  # unsealed: tried, not judged
    restored = checkpoint.restore_or_init(ckpt, target, lambda: None, {"n": 1})
    assert int(restored.step) == 1 and ckpt.moved == [2]
  assert tree_hashes(restored.params) == tree_hashes(params)
  # A sealed checkpoint that does not fit the run is a config error, never "damage".
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3,) + x.shape, x.dtype,
                                                        sharding=x.sharding), target)
    with pytest.raises(ValueError, match="step 1 is intact but does not fit"):
      checkpoint.restore_or_init(ckpt, wrong, lambda: None, {"n": 1})
    assert ckpt.latest_step() == 1 and not ckpt.moved


def test_restore_params_refuses_a_damaged_step(tmp_path, tok):
  cfg, params = tiny_model(tok, single_device_sharder())
  abstract = transformer.abstract_params(cfg)
  tx, _ = optim.make_optimizer(sft_config.get_config("tiny").optim, 10, abstract)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(optim.init_train_state(params, tx, jax.random.key(0)), {}, force=True)
  damage(os.path.join(tmp_path, "0"))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, transformer.param_shardings(cfg, single_device_sharder()))
  with pytest.raises(ValueError, match="step 0 is damaged .*rerun the stage"):
    checkpoint.restore_params(str(tmp_path), target)


# --- Bad input -----------------------------------------------------------------------------------


def test_bad_input_errors(tmp_path, records_dir, tok):
  with pytest.raises(FileNotFoundError, match="critique-revision records"):
    p3_sft.load_data(tiny_config(str(tmp_path / "nope")), str(tmp_path), tok)
  helpful_only = str(tmp_path / "helpful_only")
  records.write_shard(helpful_only, 0, make_records(n_red=0, n_help=2))
  config = tiny_config(helpful_only)
  config.data.helpful_ratio = 0.0
  with pytest.raises(ValueError, match="usable SFT"):
    p3_sft.load_data(config, str(tmp_path), tok)
  config = tiny_config(records_dir)
  config.data.seq_len = 40
  config.data.truncation = "error"
  with pytest.raises(ValueError, match="more than data.seq_len"):
    p3_sft.load_data(config, str(tmp_path), tok)
  config.data.truncation = "truncate"
  train, _ = p3_sft.load_data(config, str(tmp_path), tok)
  assert train.size and train.lengths_E.max() <= 41


# --- The phase binary ----------------------------------------------------------


@pytest.mark.slow
def test_phase_binary_end_to_end(tmp_path, records_dir):
  workdir = str(tmp_path / "cai")
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "cai_jax.phases.p3_sft", "--config=configs/sft.py:tiny",
         f"--workdir={workdir}", f"--config.data.records_dir={records_dir}",
         "--config.train.num_steps=4", "--config.train.save_every=2"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "status='done'" in proc.stdout
  out = paths.stage_dir(workdir, paths.SFT)
  with checkpoint.Checkpointer(os.path.join(out, "checkpoints")) as ckpt:
    assert ckpt.latest_step() == 4
    assert ckpt.restore_data()["step"] == 4
  lines = read_metrics(out)
  assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]
  assert any("eval_loss" in m for m in lines)
  assert any("tokens_per_s" in m for m in lines)
  assert os.listdir(os.path.join(out, "tensorboard"))
  cfg, params = hf.load_hf(os.path.join(out, "hf"))
  assert cfg.num_layers == 2 and cfg.vocab_size == 264
  with open(os.path.join(out, "hf", "config.json")) as f:
    assert json.load(f)["vocab_size"] == 264
  reloaded = Tokenizer.from_dir(os.path.join(out, "hf"))
  assert reloaded.encode("hi <|im_end|>") == load.byte_tokenizer().encode("hi <|im_end|>")


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_a_step_keeps_the_train_state_dtypes(param_dtype):
  """bfloat16 checkpoints (the `full` presets) train with bfloat16 Adam moments:
  after a step every leaf of the state has the dtype it started with."""
  import jax.numpy as jnp
  import ml_collections
  from cai_jax.configs import sft as sft_config
  cfg = dataclasses.replace(model_config.tiny_llama(), param_dtype=param_dtype)
  abstract = transformer.abstract_params(cfg)
  tx, schedule = optim.make_optimizer(
      ml_collections.ConfigDict(sft_config.get_config("cpu").optim.to_dict()), 10, abstract)
  state = optim.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract,
                           opt_state=jax.eval_shape(tx.init, abstract),
                           key=jax.eval_shape(lambda: jax.random.key(0)))
  batch = {k: jax.ShapeDtypeStruct((2, 16), d) for k, d in (
      ("inputs", jnp.int32), ("targets", jnp.int32), ("input_mask", jnp.bool_),
      ("loss_mask", jnp.bool_))}
  out, _ = jax.eval_shape(functools.partial(
      sft_step.train_step, cfg=cfg, tx=tx, schedule=schedule, sharder=None, microbatches=1,
      loss_chunk=8), state, batch)
  changed = [(jax.tree_util.keystr(p), a.dtype, b.dtype) for (p, a), b in zip(
      jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(out)) if a.dtype != b.dtype]
  assert not changed, changed
