"""Loading a model (checkpoints/load.py) from a GGUF file, an HF directory or a bundled
asset, and its errors."""

import jax.numpy as jnp
import pytest

from cai_jax.checkpoints import gguf as gguf_ckpt
from cai_jax.checkpoints import hf
from cai_jax.checkpoints.hf import CheckpointError
from cai_jax.checkpoints.load import load_model

from test_gguf import _assert_same_params, tiny_llama_gguf


def test_load_model_from_gguf_and_dir(tiny_llama_gguf, tmp_path):
  path, cfg, params, raw = tiny_llama_gguf
  root = str(tmp_path / "cache")
  got_cfg, got, tok = load_model(path, cache_root=root)
  im_end = raw.token_to_id("<|im_end|>")
  # The chat end token joins the model's EOS list, so sampling stops after a turn.
  assert got_cfg.eos_token_ids == (cfg.eos_token_ids[0], im_end)
  assert tok.eos_ids == (raw.token_to_id("</s>"), im_end)
  ref = hf.params_from_tensors(hf.iter_hf_tensors(params, cfg), cfg)
  _assert_same_params(got, ref)

  direct_cfg, direct, _ = load_model(path, cache=False)
  _assert_same_params(direct, ref)
  assert direct_cfg.eos_token_ids == got_cfg.eos_token_ids

  hf_dir = gguf_ckpt.cached_dir_for(path, root)
  dir_cfg, from_dir, dir_tok = load_model(hf_dir, param_dtype="bfloat16")
  assert dir_cfg.param_dtype == "bfloat16"
  assert from_dir["embed"].dtype == jnp.bfloat16
  assert dir_tok.encode("Hello world!") == tok.encode("Hello world!")


def test_load_model_errors(tmp_path):
  with pytest.raises(CheckpointError, match="not a bundled asset"):
    load_model("no such model")
  with pytest.raises(CheckpointError, match="no such GGUF"):
    load_model(str(tmp_path / "missing.gguf"))
  # Fails offline (no network) and online (no such repository) alike.
  with pytest.raises(CheckpointError, match="could not download"):
    load_model("cai-jax-tests/no-such-model-0123456789")
