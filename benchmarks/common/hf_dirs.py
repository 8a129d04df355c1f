"""The model a benchmark runs, as a Hugging Face directory every implementation loads
(a module of its own: importing a benchmark script would define its flags)."""

from __future__ import annotations

import os


def model_hf_dir(model: str, tmp: str) -> str:
  """A HF directory of `model`: the cached conversion of an asset, or random weights."""
  if model.startswith("random:"):
    from cai_jax.checkpoints import hf
    from cai_jax.checkpoints.load import load_model
    cfg, params, tok = load_model(model, param_dtype="float32", dtype="float32")
    path = os.path.join(tmp, "hf")
    hf.save_hf(params, cfg, path)
    tok.save(path)
    return path
  from cai_jax import assets
  from cai_jax.checkpoints import gguf
  return gguf.cached_hf_dir(assets.gguf_path(model))
