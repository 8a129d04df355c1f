"""Stage 7's DPO alternative end to end: learning a synthetic preference, bad config, LoRA."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import paths
from cai_jax.checkpoints import hf, load
from cai_jax.data import comparisons
from cai_jax.phases import p7_dpo
from cai_jax.rl import dpo
from cai_jax.training.metrics import read_metrics

from resume_helpers import assert_same_state, sigterm_at
from test_dpo import tiny_config
from test_preference_model import as_comparisons, marker_records, write_labels


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
