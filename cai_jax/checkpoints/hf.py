"""Hugging Face checkpoint directories in and out.

In: `config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json`. Weights are read tensor by tensor (memory
mapped) into one stacked host buffer per parameter, and each parameter is
placed into its sharding as soon as it is complete, so peak host memory is
about one model plus one parameter. Only safetensors are read: never pickles,
never remote code.

Out: the same layout, which `transformers.AutoModelForCausalLM` loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from cai_jax.model import transformer
from cai_jax.model.config import Llama3RopeScaling, ModelConfig
from cai_jax.model.sharding import Sharder

Params = dict[str, Any]


class CheckpointError(ValueError):
  """A checkpoint that cannot be read; the message names the file and the fix."""


# --- config.json <-> ModelConfig -------------------------------------------------

_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2",
             "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _rope_params(hf: dict, layer_type: str | None = None) -> dict:
  """The RoPE parameters in either the transformers 4 or 5 config layout."""
  rp = hf.get("rope_parameters")
  if rp and layer_type and layer_type in rp:
    return rp[layer_type] or {}
  if rp and "rope_theta" in rp:
    return rp
  legacy = dict(hf.get("rope_scaling") or {})
  if "type" in legacy and "rope_type" not in legacy:
    legacy["rope_type"] = legacy.pop("type")
  if layer_type == "sliding_attention":
    legacy = {"rope_type": "default"}
    legacy["rope_theta"] = hf.get("rope_local_base_freq", 10_000.0)
  else:
    legacy.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
  return legacy


def _llama3_scaling(rp: dict, where: str) -> Llama3RopeScaling | None:
  kind = rp.get("rope_type", "default")
  if kind in ("default", None):
    return None
  if kind != "llama3":
    raise CheckpointError(
        f"{where}: rope_type {kind!r} is not supported (supported: default,"
        " llama3); convert the checkpoint or extend cai_jax.model.transformer")
  return Llama3RopeScaling(
      factor=float(rp["factor"]), low_freq_factor=float(rp["low_freq_factor"]),
      high_freq_factor=float(rp["high_freq_factor"]),
      original_max_position_embeddings=int(rp["original_max_position_embeddings"]))


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
  """A ModelConfig from a parsed Hugging Face config.json."""
  if hf.get("model_type") == "gemma3" and "text_config" in hf:
    hf = {**hf["text_config"], "model_type": "gemma3_text"}
  model_type = hf.get("model_type")
  if model_type not in _FAMILIES:
    raise CheckpointError(
        f"{where}: model_type {model_type!r} is not supported; supported:"
        f" {sorted(_FAMILIES)}")
  family = _FAMILIES[model_type]
  try:
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    eos = hf.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    common = dict(
        family=family, vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        mlp_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 8192),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos,
        pad_token_id=hf.get("pad_token_id"),
        tie_embeddings=hf.get("tie_word_embeddings", family == "gemma3"))
  except KeyError as e:
    raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None

  if family == "gemma3":
    n = common["num_layers"]
    types = hf.get("layer_types")
    if not types:
      pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
      types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
               for i in range(n)]
    global_rp = _rope_params(hf, "full_attention")
    local_rp = _rope_params(hf, "sliding_attention")
    extra = dict(
        rope_theta=float(global_rp.get("rope_theta", 1_000_000.0)),
        rope_scaling=_llama3_scaling(global_rp, where) if global_rp.get(
            "rope_type") == "llama3" else _linear_unsupported(global_rp, where),
        local_rope_theta=float(local_rp.get("rope_theta", 10_000.0)),
        sliding_window=hf.get("sliding_window"),
        layer_types=tuple("local" if t == "sliding_attention" else "global" for t in types),
        qk_norm=True, norm_plus_one=True, post_norms=True, scale_embeddings=True,
        activation="gelu_tanh",
        query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        final_logit_softcap=hf.get("final_logit_softcapping"),
        attn_logit_softcap=hf.get("attn_logit_softcapping"))
  else:
    rp = _rope_params(hf)
    window = hf.get("sliding_window")
    if family == "qwen2" and not hf.get("use_sliding_window", False):
      window = None
    if family == "llama":
      window = None
    extra = dict(rope_theta=float(rp.get("rope_theta", 10_000.0)),
                 rope_scaling=_llama3_scaling(rp, where), sliding_window=window,
                 qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (silu)")
  return ModelConfig(**{**common, **extra, **overrides})


def _linear_unsupported(rp: dict, where: str):
  kind = rp.get("rope_type", "default")
  if kind not in ("default", None):
    raise CheckpointError(
        f"{where}: Gemma 3 rope_type {kind!r} is not supported yet (only the"
        " 270M/1B layout without RoPE scaling)")
  return None


def config_to_hf(cfg: ModelConfig) -> dict:
  """A transformers config.json dict for `cfg`."""
  eos = list(cfg.eos_token_ids)
  base = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": cfg.max_seq_len,
      "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
      "pad_token_id": cfg.pad_token_id, "torch_dtype": cfg.param_dtype,
      "dtype": cfg.param_dtype,
  }
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}
  if cfg.family == "gemma3":
    types = ["sliding_attention" if t == "local" else "full_attention"
             for t in cfg.resolved_layer_types]
    return {**base, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            "hidden_activation": "gelu_pytorch_tanh", "layer_types": types,
            "sliding_window": cfg.sliding_window,
            "query_pre_attn_scalar": round(cfg.scale**-2),
            "final_logit_softcapping": cfg.final_logit_softcap,
            "attn_logit_softcapping": cfg.attn_logit_softcap,
            "rope_parameters": {
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": cfg.local_rope_theta}},
            # transformers 4.x field names, for older readers.
            "rope_theta": cfg.rope_theta, "rope_local_base_freq": cfg.local_rope_theta}
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}[cfg.family]
  out = {**base, "model_type": cfg.family, "architectures": [arch],
         "hidden_act": "silu", "rope_parameters": rope, "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    out["rope_scaling"] = rope
  if cfg.family == "llama":
    out["attention_bias"] = cfg.qkv_bias
    out["mlp_bias"] = False
  if cfg.family == "mistral":
    out["sliding_window"] = cfg.sliding_window
  if cfg.family == "qwen2":
    out["use_sliding_window"] = False
    out["sliding_window"] = None
  return out


# --- Tensor name mapping -----------------------------------------------------------
# Each of our parameters <-> one HF tensor per layer, with a reshape/transpose.
# Functions take (HF array, cfg) -> ours; the inverse (ours, cfg) -> HF.


def _to_heads(n_attr):
  def f(w, cfg):  # [n*H, D] -> [D, n, H]
    n = getattr(cfg, n_attr)
    return w.reshape(n, cfg.head_dim, cfg.dim).transpose(2, 0, 1)
  def inv(w, cfg):
    return w.transpose(1, 2, 0).reshape(-1, cfg.dim)
  return f, inv


def _bias(n_attr):
  def f(b, cfg):
    return b.reshape(getattr(cfg, n_attr), cfg.head_dim)
  return f, lambda b, cfg: b.reshape(-1)


_T = (lambda w, cfg: w.T, lambda w, cfg: w.T)
_ID = (lambda w, cfg: w, lambda w, cfg: w)
_O = (lambda w, cfg: w.reshape(cfg.dim, cfg.num_heads, cfg.head_dim).transpose(1, 2, 0),
      lambda w, cfg: w.transpose(2, 0, 1).reshape(cfg.dim, -1))


def layer_tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, tuple]]:
  """Our per-layer param path -> (HF name suffix after 'layers.{i}.', transforms)."""
  m = {
      ("attn", "q"): ("self_attn.q_proj.weight", _to_heads("num_heads")),
      ("attn", "k"): ("self_attn.k_proj.weight", _to_heads("num_kv_heads")),
      ("attn", "v"): ("self_attn.v_proj.weight", _to_heads("num_kv_heads")),
      ("attn", "o"): ("self_attn.o_proj.weight", _O),
      ("mlp", "gate"): ("mlp.gate_proj.weight", _T),
      ("mlp", "up"): ("mlp.up_proj.weight", _T),
      ("mlp", "down"): ("mlp.down_proj.weight", _T),
      ("attn_norm",): ("input_layernorm.weight", _ID),
  }
  if cfg.post_norms:
    m[("post_attn_norm",)] = ("post_attention_layernorm.weight", _ID)
    m[("mlp_norm",)] = ("pre_feedforward_layernorm.weight", _ID)
    m[("post_mlp_norm",)] = ("post_feedforward_layernorm.weight", _ID)
  else:
    m[("mlp_norm",)] = ("post_attention_layernorm.weight", _ID)
  if cfg.qkv_bias:
    m[("attn", "q_bias")] = ("self_attn.q_proj.bias", _bias("num_heads"))
    m[("attn", "k_bias")] = ("self_attn.k_proj.bias", _bias("num_kv_heads"))
    m[("attn", "v_bias")] = ("self_attn.v_proj.bias", _bias("num_kv_heads"))
  if cfg.qk_norm:
    m[("attn", "q_norm")] = ("self_attn.q_norm.weight", _ID)
    m[("attn", "k_norm")] = ("self_attn.k_norm.weight", _ID)
  return m


def global_tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, tuple]]:
  m = {("embed",): ("model.embed_tokens.weight", _ID),
       ("final_norm",): ("model.norm.weight", _ID)}
  if not cfg.tie_embeddings:
    m[("unembed",)] = ("lm_head.weight", _T)
  return m


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# --- Reading -------------------------------------------------------------------------

_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _canonical(name: str) -> str:
  for p in _PREFIXES:
    if name.startswith(p):
      rest = name[len(p):]
      return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
  return name


def _safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, x) for x in files]
  if os.path.exists(single):
    return [single]
  found = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
  if not found:
    raise CheckpointError(
        f"{path}: no model.safetensors, model.safetensors.index.json or"
        " *.safetensors file; cai_jax reads only safetensors (convert .bin"
        " checkpoints with transformers' save_pretrained(safe_serialization=True))")
  return [os.path.join(path, x) for x in found]


def read_hf_config(path: str, **overrides) -> ModelConfig:
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise CheckpointError(f"{path}: no config.json; is this a Hugging Face model directory?")
  try:
    with open(cfg_file) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
  return config_from_hf(hf, cfg_file, **overrides)


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for every tensor of a HF directory, one at a time."""
  for file in _safetensors_files(path):
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          yield name, f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types
      if isinstance(e, CheckpointError):
        raise
      raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None


def params_from_tensors(tensors: Iterator[tuple[str, np.ndarray]], cfg: ModelConfig,
                        sharder: Sharder | None = None, where: str = "checkpoint"
                        ) -> Params:
  """Assemble our params from (HF name, array) pairs, streaming.

  Each stacked parameter is placed on device (into its sharding when a sharder
  is given) as soon as all its layers have arrived, and its host buffer freed.
  """
  shapes = transformer.param_shapes(cfg)
  dtype = cfg.weight_dtype
  by_name: dict[str, tuple[tuple[str, ...], int | None, Callable]] = {}
  for path, (hf_name, (fwd, _)) in global_tensor_map(cfg).items():
    by_name[hf_name] = (path, None, fwd)
  layer_map = layer_tensor_map(cfg)
  for i in range(cfg.num_layers):
    for path, (suffix, (fwd, _)) in layer_map.items():
      by_name[f"model.layers.{i}.{suffix}"] = (("layers",) + path, i, fwd)

  buffers: dict[tuple[str, ...], np.ndarray] = {}
  remaining: dict[tuple[str, ...], int] = {}
  out: Params = {}

  def place(path, buf):
    spec = _get(shapes, path)
    if sharder is None:
      arr = jax.device_put(buf)
    else:
      sharding = sharder.sharding(spec[1], spec[0])
      arr = jax.make_array_from_callback(buf.shape, sharding, lambda idx: buf[idx])
    _set(out, path, arr)

  for name, array in tensors:
    name = _canonical(name)
    if name not in by_name:
      if name == "lm_head.weight" and cfg.tie_embeddings:
        continue  # a tied checkpoint may still store the copy
      if name.endswith("rotary_emb.inv_freq"):
        continue
      raise CheckpointError(f"{where}: unexpected tensor {name!r} for a"
                            f" {cfg.family} model; is config.json from the same model?")
    path, layer, fwd = by_name[name]
    shape = _get(shapes, path)[0]
    value = np.asarray(fwd(array, cfg))
    if layer is None:
      if value.shape != shape:
        raise CheckpointError(f"{where}: tensor {name!r} has shape {array.shape},"
                              f" config.json implies {shape}")
      place(path, value.astype(dtype, copy=False))
      continue
    if path not in buffers:
      buffers[path] = np.empty(shape, dtype)
      remaining[path] = cfg.num_layers
    if value.shape != shape[1:]:
      raise CheckpointError(f"{where}: tensor {name!r} has shape {array.shape},"
                            f" config.json implies {shape[1:]} per layer")
    buffers[path][layer] = value
    remaining[path] -= 1
    if remaining[path] == 0:
      place(path, buffers.pop(path))

  missing = [n for n, (p, _, _) in by_name.items()
             if (p in buffers) or not _has(out, p)]
  if missing:
    raise CheckpointError(f"{where}: missing tensors, e.g. {missing[:3]}"
                          f" ({len(missing)} in all)")
  return out


def _has(tree, path) -> bool:
  try:
    _get(tree, path)
    return True
  except KeyError:
    return False


def load_hf(path: str, sharder: Sharder | None = None, **overrides
            ) -> tuple[ModelConfig, Params]:
  """(config, params) from a Hugging Face model directory."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory; pass a Hugging Face model"
                          " directory (config.json + *.safetensors)")
  cfg = read_hf_config(path, **overrides)
  params = params_from_tensors(iter_safetensors(path), cfg, sharder, where=path)
  return cfg, params


# --- Writing ---------------------------------------------------------------------------


def iter_hf_tensors(params: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) for every tensor, gathering one parameter at a time."""
  for path, (hf_name, (_, inv)) in global_tensor_map(cfg).items():
    yield hf_name, np.ascontiguousarray(inv(np.asarray(_get(params, path)), cfg))
  for path, (suffix, (_, inv)) in layer_tensor_map(cfg).items():
    stacked = np.asarray(_get(params, ("layers",) + path))
    for i in range(cfg.num_layers):
      yield f"model.layers.{i}.{suffix}", np.ascontiguousarray(inv(stacked[i], cfg))


def save_hf(params: Params, cfg: ModelConfig, path: str, *, tokenizer=None,
            max_shard_bytes: int = 2 * 1024**3) -> None:
  """Write a Hugging Face directory (config.json + safetensors shards).

  Written to a temporary directory and renamed at the end, so a killed export
  never leaves a half-written model at `path`.
  """
  tmp = path.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  weight_map: dict[str, str] = {}
  shard: dict[str, np.ndarray] = {}
  files: list[str] = []

  def flush():
    fname = f"model-{len(files) + 1:05d}.safetensors"
    save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in shard})
    files.append(fname)
    shard.clear()

  total_bytes = 0
  for name, array in iter_hf_tensors(params, cfg):
    if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
      flush()
    shard[name] = array
    total_bytes += array.nbytes
  flush()
  if len(files) == 1:
    os.rename(os.path.join(tmp, files[0]), os.path.join(tmp, "model.safetensors"))
  else:
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                f, indent=1)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
  if tokenizer is not None:
    tokenizer.save(tmp)
  shutil.rmtree(path, ignore_errors=True)
  os.rename(tmp, path)
