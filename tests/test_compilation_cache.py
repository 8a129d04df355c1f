"""The persistent compilation cache: a second process reads what the first compiled.

The threshold is 0 here: on a fast machine this small program compiles in under
the default 0.2 s, and would (rightly) not be cached."""

import os
import subprocess
import sys

PROGRAM = """
import sys, time, jax, jax.numpy as jnp
from cai_jax import compilation_cache
print(compilation_cache.enable(sys.argv[1], min_compile_secs=0.0))
def f(x):
  for _ in range(40):
    x = jnp.tanh(x @ x.T) + jnp.sin(x)
  return x
t = time.perf_counter()
jax.jit(f).lower(jnp.ones((32, 32))).compile()
print(time.perf_counter() - t)
"""


def _run(cache: str) -> tuple[str, float]:
  out = subprocess.run([sys.executable, "-c", PROGRAM, cache], capture_output=True, text=True,
                       check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.split()
  return out[0] if len(out) > 1 else "", float(out[-1])


def test_second_process_reads_the_cache(tmp_path):
  cache = str(tmp_path / "jax")
  path, first = _run(cache)
  assert path == cache
  entries = [f for f in os.listdir(cache) if f.startswith("jit_f")]
  assert entries, (os.listdir(cache), first)
  _run(cache)  # a hit writes nothing new
  assert sorted(f for f in os.listdir(cache) if f.startswith("jit_f")) == entries


def test_empty_setting_turns_it_off(monkeypatch):
  from cai_jax import assets, compilation_cache
  assert compilation_cache.enable("") == ""
  assert compilation_cache.directory("/x") == "/x"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/from/jax")  # JAX's own variable wins
  assert compilation_cache.directory() == "/from/jax"
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert compilation_cache.directory() == os.path.join(assets.cache_root(), "jax")
