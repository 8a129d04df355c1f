"""Checkpoints in and out: Hugging Face directories, GGUF files, bundled assets.

`load_model(spec)` (in `load.py`) is the one entry point; it is imported
lazily so that `import cai_jax.checkpoints.hf` stays light.
"""


def __getattr__(name):
  if name == "load_model":
    from cai_jax.checkpoints.load import load_model
    return load_model
  raise AttributeError(f"module 'cai_jax.checkpoints' has no attribute {name!r}")
