"""Export to a Hugging Face directory: transformers loads it and gives our logits."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.checkpoints import hf
from cai_jax.model import transformer
from conftest import TINY_PRESETS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", sorted(TINY_PRESETS))
def test_export_loads_in_transformers_with_our_logits(family, tmp_path):
  cfg = TINY_PRESETS[family]()
  params = transformer.init_params(cfg, jax.random.key(0))
  # Norms away from their init so a wrong norm convention would show.
  params["layers"]["attn_norm"] = params["layers"]["attn_norm"] + 0.3
  out = str(tmp_path / "export")
  hf.save_hf(params, cfg, out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, 20))
  ours, _ = transformer.forward(params, jnp.asarray(tokens), cfg)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens)).logits.numpy()
  assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4


def test_sharded_export_round_trip(tmp_path):
  cfg = TINY_PRESETS["gemma3"]()
  params = transformer.init_params(cfg, jax.random.key(1))
  out = str(tmp_path / "sharded")
  hf.save_hf(params, cfg, out, max_shard_bytes=100_000)
  files = sorted(os.listdir(out))
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert len(index["weight_map"]) == len(list(hf.iter_hf_tensors(params, cfg)))
  cfg2, params2 = hf.load_hf(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_export_is_atomic(tmp_path, monkeypatch):
  """A failure mid-export leaves an existing export untouched."""
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(2))
  out = str(tmp_path / "model")
  hf.save_hf(params, cfg, out)
  before = sorted(os.listdir(out))

  def broken(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(hf, "save_file", broken)
  with pytest.raises(OSError):
    hf.save_hf(params, cfg, out)
  assert sorted(os.listdir(out)) == before
  hf.load_hf(out)


def test_missing_and_bad_checkpoints_name_the_file(tmp_path):
  with pytest.raises(hf.CheckpointError, match="not a directory"):
    hf.load_hf(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(hf.CheckpointError, match="config.json"):
    hf.load_hf(str(tmp_path / "empty"))
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(0))
  out = tmp_path / "m"
  hf.save_hf(params, cfg, str(out))
  cfg_json = json.loads((out / "config.json").read_text())
  cfg_json["num_hidden_layers"] = 3
  (out / "config.json").write_text(json.dumps(cfg_json))
  with pytest.raises(hf.CheckpointError, match="missing tensors"):
    hf.load_hf(str(out))
  cfg_json["num_hidden_layers"] = 2
  cfg_json["hidden_size"] = 32
  (out / "config.json").write_text(json.dumps(cfg_json))
  with pytest.raises(hf.CheckpointError, match="shape"):
    hf.load_hf(str(out))
  (out / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(hf.CheckpointError, match="model.safetensors"):
    hf.load_hf(str(out))
  cfg_json["model_type"] = "bert"
  (out / "config.json").write_text(json.dumps(cfg_json))
  with pytest.raises(hf.CheckpointError, match="model_type 'bert'"):
    hf.load_hf(str(out))
