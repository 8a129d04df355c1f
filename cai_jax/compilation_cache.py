"""JAX's persistent compilation cache: a compiled program is written to disk once and
read back by later stages, reruns and resumed runs instead of being compiled again.

Every binary turns it on (`--compilation_cache`, default `<cache root>/jax`,
see `assets.cache_root`; "" turns it off). Entries are keyed by the program,
the backend and the JAX version, so a stale entry is never used.
"""

from __future__ import annotations

import os

import jax

from cai_jax import assets

DEFAULT = "auto"


def directory(setting: str = DEFAULT) -> str:
  """The cache directory for a flag value. "auto": JAX's own `JAX_COMPILATION_CACHE_DIR`
  when it is set, else `<cai_jax cache root>/jax`."""
  if setting != DEFAULT:
    return setting
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(assets.cache_root(), "jax")


def enable(setting: str = DEFAULT, min_compile_secs: float = 0.2) -> str:
  """Turns the cache on for every compile that takes at least `min_compile_secs`
  (cheaper programs are faster to compile than to read back); returns its
  directory, or "" when `setting` is ""."""
  if not setting:
    return ""
  path = directory(setting)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
