"""Stage 3 (SFT) end to end: a non-finite loss, a damaged checkpoint, bad input, the
binary, LoRA."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import paths, records
from cai_jax.checkpoints import hf, load
from cai_jax.model import lora, transformer
from cai_jax.phases import p3_sft
from cai_jax.text.tokenizer import Tokenizer
from cai_jax.training import checkpoint
from cai_jax.training.metrics import read_metrics

from cai_jax.faults import damage
from resume_helpers import assert_same_state, run_phase_binary, sigterm_at, tree_hashes
from test_lora import _inputs
from test_sft import make_records, records_dir, tiny_config, tok


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


@pytest.mark.slow
def test_phase_binary_end_to_end(tmp_path, records_dir):
  workdir = str(tmp_path / "cai")
  run_phase_binary("p3_sft", "--config=configs/sft.py:tiny",
                   f"--workdir={workdir}", f"--config.data.records_dir={records_dir}",
                   "--config.train.num_steps=4", "--config.train.save_every=2")
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


def _lora_config(records_dir, **train):
  c = tiny_config(records_dir, **train)
  c.lora.rank, c.lora.alpha = 4, 8.0
  c.optim.lr = 1e-2
  return c


def test_sft_with_lora_trains_adapters_only_and_exports_the_merged_model(tmp_path,
                                                                         records_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = _lora_config(records_dir, num_steps=6, save_every=3, eval_every=6)
  result = p3_sft.run(config, str(tmp_path))
  assert result.status == "done" and result.step == 6
  adapters = result.state.params
  assert set(adapters) == {"layers"}  # the state holds the adapters alone ...
  assert jax.tree.structure(result.state.opt_state[1][0].mu) == jax.tree.structure(adapters)
  assert any(float(jnp.abs(ab["b"]).max()) > 0  # ... and they moved
             for group in adapters["layers"].values() for ab in group.values())
  out = paths.stage_dir(str(tmp_path), paths.SFT)
  with checkpoint.Checkpointer(os.path.join(out, "checkpoints")) as ckpt:
    assert ckpt.latest_step() == 6
  # The export is base + adapters; transformers reads it as the adapted model.
  from cai_jax.checkpoints import load
  cfg, base, _ = load.load_model(config.model, None, tokenizer="bytes",
                                 key=jax.random.split(jax.random.key(config.seed))[0],
                                 **dict(config.model_overrides))
  ids, mask = _inputs()
  ours, _ = transformer.forward(lora.attach(base, adapters, lora.LoraSpec.from_config(
      config.lora)), ids, cfg, mask_BT=mask)
  hf_dir = paths.hf_export(str(tmp_path), paths.SFT)
  cfg2, exported = hf.load_hf(hf_dir)
  theirs_jax, _ = transformer.forward(exported, ids, cfg2, mask_BT=mask)
  np.testing.assert_allclose(theirs_jax, ours, atol=1e-4)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  positions = np.maximum(np.cumsum(np.asarray(mask), axis=1) - 1, 0)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(np.asarray(ids)),
                   attention_mask=torch.tensor(np.asarray(mask).astype(np.int64)),
                   position_ids=torch.tensor(positions)).logits.numpy()
  m = np.asarray(mask)
  assert np.abs(theirs - np.asarray(ours))[m].max() <= 1e-4


def test_sft_with_lora_resumes_bit_identically_and_names_its_base(tmp_path, records_dir):
  config = _lora_config(records_dir, num_steps=6, save_every=100, eval_every=3)
  full = p3_sft.run(config, str(tmp_path / "full"))

  kill_at_3 = sigterm_at(3)

  assert p3_sft.run(config, str(tmp_path / "resumed"), should_stop=kill_at_3).step == 3
  resumed = p3_sft.run(config, str(tmp_path / "resumed"))
  assert resumed.status == "done" and resumed.step == 6
  assert_same_state(full.state, resumed.state, ("params", "opt_state"))
  # A checkpoint of rank-4 adapters does not resume as rank 8, nor as full fine-tuning.
  p3_sft.run(config, str(tmp_path / "other"), should_stop=kill_at_3)
  for rank in (8, 0):
    config.lora.rank = rank
    with pytest.raises(Exception, match="does not fit this run|other data"):
      p3_sft.run(config, str(tmp_path / "other"))


def test_stage3_with_packing_trains_as_the_padded_stage_does(tmp_path, records_dir):
  """`data.pack`: stage 3 with each step's conversations packed several to a row logs
  the padded run's losses (within float tolerance: the same conversations and loss,
  another summation order) and exports a model whose weights match it."""
  runs = {}
  for pack in (False, True):
    config = tiny_config(records_dir, num_steps=3, save_every=100, eval_every=100)
    config.data.pack, config.data.seq_len = pack, 256  # 128 would hold one per row
    workdir = str(tmp_path / f"pack{int(pack)}")
    if pack:  # a step's 8 conversations (51-75 tokens) in fewer rows of 256
      from cai_jax.data import sft as sft_data
      train, _ = p3_sft.load_data(config, workdir, load.byte_tokenizer())
      assert sft_data.make_packed_batch(train, np.arange(8), 256, 0, 1)["inputs"].shape[0] < 8
    p3_sft.run(config, workdir)
    out = paths.stage_dir(workdir, paths.SFT)
    runs[pack] = ([m["loss"] for m in read_metrics(out) if "loss" in m],
                  hf.load_hf(os.path.join(out, "hf"))[1])
  np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(runs[True][1]), jax.tree.leaves(runs[False][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
