"""GGUF (llama.cpp) checkpoints in: config from metadata, tensors dequantised.

Tensors are dequantised one at a time (to float32, PyTorch [out, in] layout),
renamed to Hugging Face names and streamed into `hf.params_from_tensors`, so
the model is never held twice. Undone on the way:
  * llama: llama.cpp permutes the rows of Q and K (and their biases) so that
    RoPE pairs are interleaved; Qwen2 and Gemma 3 are stored unpermuted.
  * gemma3: every RMSNorm weight is stored as 1 + w; we subtract 1 to get the
    HF value w (our transformer then applies 1 + w).

Dequantising a whole model takes seconds (5 s for SmolLM2, ~20 s for
Qwen-0.5B), so `cached_hf_dir` converts a GGUF once into a Hugging Face
directory that later loads reload in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from cai_jax.assets import cache_root
from cai_jax.checkpoints.hf import CheckpointError, Params, params_from_tensors, save_hf
from cai_jax.model import transformer
from cai_jax.model.config import Llama3RopeScaling, ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.text.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")
# Bumped when the conversion changes, so stale caches are not reused.
CONVERSION_VERSION = 1

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# ffn_norm is the norm before the MLP: HF calls it post_attention_layernorm in
# Llama/Qwen2 and pre_feedforward_layernorm in Gemma (which has 4 norms).
_FFN_NORM = {"llama": "post_attention_layernorm", "qwen2": "post_attention_layernorm",
             "gemma3": "pre_feedforward_layernorm"}
_GEMMA_END_OF_TURN = 106
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
               "tokenizer.ggml.token_type")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _reader(path: str):
  import gguf
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such GGUF file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError/struct errors on bad files
    raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e


def _fields(reader) -> dict[str, Any]:
  """Metadata as plain Python values, without the tokenizer arrays (slow to decode).

  float32 values are given as their shortest decimal (1e-05, not
  9.999999747378752e-06), as the original config.json had them.
  """
  import gguf
  out = {}
  for key, field in reader.fields.items():
    if key in _BIG_ARRAYS:
      continue
    try:
      value = field.contents()
    except Exception:  # unknown value types: not needed for the config
      continue
    if field.types == [gguf.GGUFValueType.FLOAT32]:
      value = float(str(np.float32(value)))
    out[key] = value
  return out


def _num_tokens(reader) -> int | None:
  field = reader.fields.get("tokenizer.ggml.tokens")
  return None if field is None else len(field.data)


def _token(reader, i: int) -> str | None:
  """Token string `i` of the GGUF vocabulary, decoding only that one."""
  field = reader.fields.get("tokenizer.ggml.tokens")
  if field is None or i >= len(field.data):
    return None
  return bytes(field.parts[field.data[i]]).decode("utf-8", errors="replace")


# --- Metadata -> ModelConfig ---------------------------------------------------------


def _rope_scaling_from_freqs(factors: np.ndarray, cfg: ModelConfig, where: str
                             ) -> Llama3RopeScaling:
  """The Llama-3 RoPE scaling that llama.cpp baked into `rope_freqs.weight`.

  llama.cpp stores, per frequency, the divisor of the unscaled inverse
  frequency. The Llama-3 formula is linear in 1/wavelength between two
  wavelength cut-offs; fitting that line gives (factor, low, high, original
  context) up to a common scale of (low, high, context), which leaves the
  frequencies unchanged, so low_freq_factor is fixed to 1. Checked by
  recomputing the frequencies.
  """
  base = transformer.rope_inv_freq(cfg, cfg.rope_theta)
  factors = np.asarray(factors, np.float64).reshape(-1)
  if factors.shape != base.shape:
    raise CheckpointError(f"{where}: rope_freqs.weight has {factors.size} entries,"
                          f" head_dim {cfg.head_dim} implies {base.size}")
  factor = float(factors.max())
  smooth_pts = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
  fix = ("convert the original Hugging Face checkpoint instead"
         " (load_model on its directory)")
  if smooth_pts.sum() < 2:
    raise CheckpointError(f"{where}: cannot infer the Llama-3 RoPE scaling from"
                          f" rope_freqs.weight (too few interpolated frequencies); {fix}")
  x = base.astype(np.float64)[smooth_pts] / (2 * np.pi)  # 1 / wavelength
  s = (1 / factors[smooth_pts] - 1 / factor) / (1 - 1 / factor)
  a, b = np.polyfit(x, s, 1)
  high = 1 - 1 / b
  scaling = Llama3RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=float(high),
                              original_max_position_embeddings=int(round(a * (high - 1))))
  got = transformer.rope_inv_freq(cfg.replace(rope_scaling=scaling), cfg.rope_theta)
  if not np.allclose(got, base / factors, rtol=1e-4, atol=0):
    raise CheckpointError(f"{where}: rope_freqs.weight is not a Llama-3 RoPE scaling"
                          f" (fitted {scaling} does not reproduce it); {fix}")
  return scaling


def config_from_gguf(reader, where: str = "model.gguf", **overrides) -> ModelConfig:
  """A ModelConfig from GGUF metadata (and tensor shapes, for vocab and tying)."""
  f = _fields(reader)
  arch = f.get("general.architecture")
  if arch not in SUPPORTED_ARCHS:
    raise CheckpointError(f"{where}: general.architecture {arch!r} is not supported;"
                          f" supported: {list(SUPPORTED_ARCHS)}")
  tensors = {t.name: t for t in reader.tensors}

  def need(key: str):
    k = f"{arch}.{key}"
    if k not in f:
      raise CheckpointError(f"{where}: missing metadata field {k!r}; was this file"
                            " written by llama.cpp's convert_hf_to_gguf.py?")
    return f[k]

  def opt(key: str, default=None):
    return f.get(f"{arch}.{key}", default)

  if "token_embd.weight" not in tensors:
    raise CheckpointError(f"{where}: no token_embd.weight tensor")
  dim = int(need("embedding_length"))
  heads = int(need("attention.head_count"))
  kv_heads = opt("attention.head_count_kv", heads)
  if isinstance(kv_heads, list):
    raise CheckpointError(f"{where}: {arch}.attention.head_count_kv varies per layer;"
                          " not supported")
  head_dim = int(opt("attention.key_length") or opt("rope.dimension_count")
                 or dim // heads)
  # GGUF shapes are [in, out]: the embedding is [dim, vocab].
  vocab = int(tensors["token_embd.weight"].shape[-1])
  n_tokens = _num_tokens(reader)
  if n_tokens is not None and n_tokens > vocab:
    raise CheckpointError(f"{where}: {n_tokens} tokens in tokenizer.ggml.tokens but"
                          f" token_embd.weight has {vocab} rows")
  eos = f.get("tokenizer.ggml.eos_token_id")
  eos_ids = [int(eos)] if eos is not None else []
  scaling_type = opt("rope.scaling.type")
  if scaling_type not in (None, "none") and not (arch == "llama" and scaling_type == "llama3"):
    raise CheckpointError(f"{where}: {arch}.rope.scaling.type {scaling_type!r} is not"
                          " supported (only no scaling, or Llama-3 rope_freqs)")
  common = dict(
      family=arch, vocab_size=vocab, dim=dim, num_layers=int(need("block_count")),
      num_heads=heads, num_kv_heads=int(kv_heads), head_dim=head_dim,
      mlp_dim=int(need("feed_forward_length")),
      norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      rope_theta=float(opt("rope.freq_base", 10_000.0)),
      max_seq_len=int(opt("context_length", 8192)),
      bos_token_id=_opt_int(f.get("tokenizer.ggml.bos_token_id")),
      pad_token_id=_opt_int(f.get("tokenizer.ggml.padding_token_id")),
      tie_embeddings="output.weight" not in tensors)
  if arch == "gemma3":
    n = common["num_layers"]
    pattern = opt("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per layer: True = sliding window
      types = tuple("local" if p else "global" for p in pattern)
    else:
      types = tuple("global" if (i + 1) % int(pattern) == 0 else "local" for i in range(n))
    # Gemma 3 chat turns end with <end_of_turn> (id 106), as in HF's generation_config.
    if _token(reader, _GEMMA_END_OF_TURN) == "<end_of_turn>":
      eos_ids.append(_GEMMA_END_OF_TURN)
    extra = dict(
        local_rope_theta=float(opt("rope.freq_base_swa", 10_000.0)),
        sliding_window=int(need("attention.sliding_window")), layer_types=types,
        qk_norm=True, norm_plus_one=True, post_norms=True, scale_embeddings=True,
        activation="gelu_tanh", query_scale=float(head_dim) ** -0.5,
        final_logit_softcap=_opt_float(opt("final_logit_softcapping")),
        attn_logit_softcap=_opt_float(opt("attn_logit_softcapping")))
  else:
    extra = dict(qkv_bias="blk.0.attn_q.bias" in tensors)
  cfg = ModelConfig(**{**common, **extra, "eos_token_ids": tuple(dict.fromkeys(eos_ids))})
  if "rope_freqs.weight" in tensors and "rope_scaling" not in overrides:
    if arch != "llama":
      raise CheckpointError(f"{where}: rope_freqs.weight in a {arch} model is not supported")
    cfg = cfg.replace(rope_scaling=_rope_scaling_from_freqs(
        _dequantize(tensors["rope_freqs.weight"]), cfg, where))
  return cfg.replace(**overrides) if overrides else cfg


def _opt_int(x) -> int | None:
  return None if x is None else int(x)


def _opt_float(x) -> float | None:
  return None if x is None else float(x)


# --- Tensors ---------------------------------------------------------------------------


def _dequantize(t) -> np.ndarray:
  """float32 in PyTorch [out, in] order."""
  import gguf
  w = gguf.quants.dequantize(t.data, t.tensor_type)
  return np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def unpermute_llama(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation (rows [n*hd], weight or bias)."""
  hd = w.shape[0] // n_heads
  return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_llama(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's permutation (HF -> GGUF), the inverse of `unpermute_llama`."""
  hd = w.shape[0] // n_heads
  return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, family: str) -> str | None:
  """The Hugging Face tensor name for a GGUF tensor name; None if unknown."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _BLOCK_RE.match(gguf_name)
  if not m:
    return None
  layer, part, kind = m.groups()
  mod = _FFN_NORM[family] if part == "ffn_norm" else _LAYER_NAMES.get(part)
  return None if mod is None else f"model.layers.{layer}.{mod}.{kind}"


def iter_gguf_tensors(reader, cfg: ModelConfig, where: str = "model.gguf"
                      ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 array in HF layout and semantics), one tensor at a time."""
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":
      continue  # folded into cfg.rope_scaling by config_from_gguf
    name = hf_name(t.name, cfg.family)
    if name is None:
      raise CheckpointError(f"{where}: unexpected tensor {t.name!r} for a {cfg.family}"
                            " GGUF; only llama.cpp's llama/qwen2/gemma3 layouts are read")
    w = _dequantize(t)
    if cfg.family == "llama":
      if ".q_proj." in name:
        w = unpermute_llama(w, cfg.num_heads)
      elif ".k_proj." in name:
        w = unpermute_llama(w, cfg.num_kv_heads)
    if cfg.family == "gemma3" and t.name.endswith("norm.weight"):
      w = w - np.float32(1.0)
    yield name, w


def load_gguf(path: str, sharder: Sharder | None = None, **overrides
              ) -> tuple[ModelConfig, Params]:
  """(config, params) straight from a GGUF file (seconds; see `cached_hf_dir`)."""
  reader = _reader(path)
  cfg = config_from_gguf(reader, path, **overrides)
  params = params_from_tensors(iter_gguf_tensors(reader, cfg, path), cfg, sharder, where=path)
  return cfg, params


def gguf_metadata(path: str) -> dict[str, Any]:
  """GGUF metadata without the tokenizer arrays (for inspection and licences)."""
  return _fields(_reader(path))


# --- Conversion cache ----------------------------------------------------------------------


def cache_key(path: str) -> str:
  """Identity of a GGUF file: path, size and mtime (cheap; no hashing of GBs)."""
  st = os.stat(path)
  ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|v{CONVERSION_VERSION}"
  return hashlib.sha256(ident.encode()).hexdigest()[:16]


def cached_dir_for(path: str, root: str | None = None) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(cache_root(root), "hf", f"{stem}-{cache_key(path)}")


def cached_hf_dir(path: str, root: str | None = None,
                  tokenizer: Tokenizer | None = None) -> str:
  """A Hugging Face directory converted from the GGUF at `path`, made once.

  The directory (config.json, fp32 safetensors, tokenizer files, chat
  template) lives under `root` (default $CAI_JAX_CACHE or ~/.cache/cai_jax) and
  is keyed by the GGUF's path, size and mtime. It is written to a temporary
  directory and renamed, so a killed conversion is never mistaken for a done
  one; concurrent converters race harmlessly (the first rename wins).
  `tokenizer`: a `cai_jax.text.tokenizer.Tokenizer` to save (default: the GGUF's).
  """
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such GGUF file")
  final = cached_dir_for(path, root)
  if _is_complete(final):
    return final
  os.makedirs(os.path.dirname(final), exist_ok=True)
  work = tempfile.mkdtemp(prefix=os.path.basename(final) + ".", suffix=".tmp",
                          dir=os.path.dirname(final))
  try:
    start = time.time()
    cfg, params = load_gguf(path)
    tok = tokenizer if tokenizer is not None else Tokenizer.from_gguf(path)
    out = os.path.join(work, "model")
    save_hf(params, cfg, out, tokenizer=tok)
    del params
    with open(os.path.join(out, "cai_jax_source.json"), "w") as f:
      json.dump({"gguf": os.path.realpath(path), "size": os.path.getsize(path),
                 "conversion_version": CONVERSION_VERSION,
                 "seconds": round(time.time() - start, 2),
                 "general": {k: v for k, v in gguf_metadata(path).items()
                             if k.startswith("general.")}}, f, indent=2, default=str)
    try:
      os.rename(out, final)
    except OSError:
      if not _is_complete(final):  # not a lost race: a real failure
        raise
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return final


def _is_complete(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "cai_jax_source.json"))
