"""Model hyper-parameters: one frozen dataclass, presets for the families we run.

A `ModelConfig` is hashable, so jitted functions take it as a static argument.
Checkpoint readers build one from a Hugging Face `config.json` or GGUF metadata
(`cai_jax.checkpoints`); the presets below are for tests and for documentation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

Family = Literal["llama", "mistral", "qwen2", "gemma3"]
LayerType = Literal["global", "local"]


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama-3.1 frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer of the Llama / Mistral / Qwen2 / Gemma 3 kind."""

  family: Family
  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float = 1e-5
  rope_theta: float = 10_000.0
  rope_scaling: Llama3RopeScaling | None = None
  # Gemma 3: local (sliding-window) layers use their own RoPE base.
  local_rope_theta: float | None = None
  sliding_window: int | None = None
  # Per layer: "global" (full causal) or "local" (sliding window). Empty means
  # every layer is local when `sliding_window` is set, else global.
  layer_types: tuple[LayerType, ...] = ()
  qkv_bias: bool = False
  qk_norm: bool = False
  # Gemma stores RMSNorm weights as w and applies (1 + w).
  norm_plus_one: bool = False
  # Gemma: extra norms after attention and after the MLP ("sandwich").
  post_norms: bool = False
  # Gemma: embeddings multiplied by sqrt(dim).
  scale_embeddings: bool = False
  activation: Literal["silu", "gelu_tanh"] = "silu"
  # Scale of q.k; None means 1/sqrt(head_dim).
  query_scale: float | None = None
  tie_embeddings: bool = True
  final_logit_softcap: float | None = None
  attn_logit_softcap: float | None = None
  max_seq_len: int = 8192
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # Storage and compute precision; norms, softmax and logits are always fp32.
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Rematerialise each layer in the backward pass: "none" or "full".
  remat: Literal["none", "full"] = "none"
  # > 0: attention runs over query chunks of this many tokens, each
  # rematerialised in the backward pass, so [B, N, T, S] logits never exist
  # at once (memory O(T * chunk) instead of O(T^2) per layer); any T (the last
  # chunk is padded with masked queries).
  attention_chunk: int = 0
  # "xla": our einsum attention (any backend, exact fp32 softmax). "cudnn":
  # cuDNN's fused flash attention on NVIDIA GPUs (bf16/fp16 compute, no
  # [B, N, T, S] logits in memory) for full-sequence passes; decode steps
  # against the KV cache keep the xla path.
  # "splash": JAX's Pallas splash (flash) attention kernel for TPUs, the same
  # full-sequence passes (causal, padding as segment ids, sliding-window layers,
  # logit soft-cap; attention_chunk does not apply); off a TPU it runs in Pallas
  # interpret mode (the tests' parity check; slow). Set it in a stage config's
  # model_overrides.
  attention_impl: Literal["xla", "cudnn", "splash"] = "xla"
  # The sampler's decode loop: "unrolled" runs the layers as straight-line code
  # over per-layer copies of the weights and cache; "scan" runs the layer scan,
  # which costs no extra memory but makes XLA copy every layer's weights and
  # cache on each step (1.6-2.3x slower decode at batch >= 8 on an H100, 1.3-1.9x
  # on a CPU; experiments/2026-11-23-decode-unrolled-layers/). "unrolled" holds one
  # more copy of the layer weights while sampling and compiles slower.
  decode_layers: Literal["unrolled", "scan"] = "unrolled"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of"
          f" num_kv_heads={self.num_kv_heads}")
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ValueError(
          f"layer_types has {len(self.layer_types)} entries for"
          f" num_layers={self.num_layers}")
    if "local" in self.resolved_layer_types and not self.sliding_window:
      raise ValueError("local layers need sliding_window to be set")
    if self.attention_impl not in ("xla", "cudnn", "splash"):
      raise ValueError(f"attention_impl={self.attention_impl!r}: use 'xla', 'cudnn' or"
                       " 'splash'")
    if self.decode_layers not in ("unrolled", "scan"):
      raise ValueError(f"decode_layers={self.decode_layers!r}: use 'unrolled' or 'scan'")
    if self.attention_impl == "cudnn":
      if self.dtype not in ("bfloat16", "float16"):
        raise ValueError(f"attention_impl='cudnn' needs dtype bfloat16 or float16, not"
                         f" {self.dtype!r} (cuDNN flash attention has no fp32 kernel)")
      if self.attn_logit_softcap:
        raise ValueError("attention_impl='cudnn' cannot apply attn_logit_softcap; use 'xla'")

  @property
  def resolved_layer_types(self) -> tuple[LayerType, ...]:
    if self.layer_types:
      return self.layer_types
    kind = "local" if self.sliding_window else "global"
    return (kind,) * self.num_layers

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def scale(self) -> float:
    return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    d, f, v = self.dim, self.mlp_dim, self.vocab_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
    norms = d * (4 if self.post_norms else 2) + (2 * self.head_dim if self.qk_norm else 0)
    per_layer = attn + 3 * d * f + norms
    return self.num_layers * per_layer + v * d * (1 if self.tie_embeddings else 2) + d

  def flops_per_token(self, context: int) -> float:
    """Forward FLOPs for one token attending to `context` keys (2 per MAC)."""
    matmul = self.num_params() - self.vocab_size * self.dim * (
        0 if self.tie_embeddings else 1)
    attn = 2 * 2 * self.num_layers * self.num_heads * self.head_dim * context
    return 2 * matmul + attn


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
  """The one JSON form of a ModelConfig (saved beside a PM, read back by `config_from_json`)."""
  return dataclasses.asdict(cfg)


def config_from_json(d: dict[str, Any]) -> ModelConfig:
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = Llama3RopeScaling(**d["rope_scaling"])
  for k in ("layer_types", "eos_token_ids"):
    d[k] = tuple(d[k])
  return ModelConfig(**d)


# --- Presets -----------------------------------------------------------------
# Tiny configs: dimensions divisible by 8 so every sharding rule applies on the
# 8-device CPU test mesh.


# What the tiny presets share; each adds its family's features.
_TINY = dict(vocab_size=256, dim=64, num_layers=2, num_heads=8, mlp_dim=128,
             max_seq_len=512, eos_token_ids=(2,), pad_token_id=0)


def _tiny(family: str, kw: dict, **features) -> ModelConfig:
  return ModelConfig(**{**_TINY, "family": family, **features, **kw})


def tiny_llama(**kw) -> ModelConfig:
  return _tiny("llama", kw, num_kv_heads=4, head_dim=16, norm_eps=1e-5, rope_theta=10_000.0,
               rope_scaling=Llama3RopeScaling(factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0,
                                              original_max_position_embeddings=64),
               tie_embeddings=False, bos_token_id=1)


def tiny_mistral(**kw) -> ModelConfig:
  return _tiny("mistral", kw, num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
               sliding_window=12, tie_embeddings=False, bos_token_id=1)


def tiny_qwen2(**kw) -> ModelConfig:
  return _tiny("qwen2", kw, num_kv_heads=2, head_dim=8, norm_eps=1e-6,
               rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True, bos_token_id=None)


def tiny_gemma3(**kw) -> ModelConfig:
  return _tiny("gemma3", kw, num_layers=4, num_kv_heads=8, head_dim=16, norm_eps=1e-6,
               rope_theta=1_000_000.0, local_rope_theta=10_000.0, sliding_window=6,
               layer_types=("local", "local", "global", "local"), qk_norm=True,
               norm_plus_one=True, post_norms=True, scale_embeddings=True,
               activation="gelu_tanh", query_scale=16**-0.5, tie_embeddings=True,
               bos_token_id=2, eos_token_ids=(1,))


def smollm2_135m(**kw) -> ModelConfig:
  base = dict(family="llama", vocab_size=49152, dim=576, num_layers=30,
              num_heads=9, num_kv_heads=3, head_dim=64, mlp_dim=1536,
              norm_eps=1e-5, rope_theta=100_000.0, tie_embeddings=True,
              max_seq_len=8192, bos_token_id=1, eos_token_ids=(2,),
              pad_token_id=2)
  return ModelConfig(**{**base, **kw})


def qwen2_5_0_5b(**kw) -> ModelConfig:
  base = dict(family="qwen2", vocab_size=151936, dim=896, num_layers=24,
              num_heads=14, num_kv_heads=2, head_dim=64, mlp_dim=4864,
              norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True,
              tie_embeddings=True, max_seq_len=32768, eos_token_ids=(151645,),
              pad_token_id=151643)
  return ModelConfig(**{**base, **kw})


def gemma3_270m(**kw) -> ModelConfig:
  types = tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(18))
  base = dict(family="gemma3", vocab_size=262144, dim=640, num_layers=18,
              num_heads=4, num_kv_heads=1, head_dim=256, mlp_dim=2048,
              norm_eps=1e-6, rope_theta=1_000_000.0, local_rope_theta=10_000.0,
              sliding_window=512, layer_types=types, qk_norm=True,
              norm_plus_one=True, post_norms=True, scale_embeddings=True,
              activation="gelu_tanh", query_scale=256**-0.5, tie_embeddings=True,
              max_seq_len=32768, bos_token_id=2, eos_token_ids=(1, 106),
              pad_token_id=0)
  return ModelConfig(**{**base, **kw})


def llama3_2_1b(**kw) -> ModelConfig:
  base = dict(family="llama", vocab_size=128256, dim=2048, num_layers=16,
              num_heads=32, num_kv_heads=8, head_dim=64, mlp_dim=8192,
              norm_eps=1e-5, rope_theta=500_000.0,
              rope_scaling=Llama3RopeScaling(factor=32.0), tie_embeddings=True,
              max_seq_len=131072, bos_token_id=128000,
              eos_token_ids=(128001, 128008, 128009), param_dtype="bfloat16",
              dtype="bfloat16")
  return ModelConfig(**{**base, **kw})


def llama3_8b(**kw) -> ModelConfig:
  base = dict(family="llama", vocab_size=128256, dim=4096, num_layers=32,
              num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336,
              norm_eps=1e-5, rope_theta=500_000.0,
              rope_scaling=Llama3RopeScaling(), tie_embeddings=False,
              max_seq_len=131072, bos_token_id=128000,
              eos_token_ids=(128001, 128008, 128009), param_dtype="bfloat16",
              dtype="bfloat16")
  return ModelConfig(**{**base, **kw})


PRESETS = {
    "tiny_llama": tiny_llama,
    "tiny_mistral": tiny_mistral,
    "tiny_qwen2": tiny_qwen2,
    "tiny_gemma3": tiny_gemma3,
    "smollm2_135m": smollm2_135m,
    "qwen2_5_0_5b": qwen2_5_0_5b,
    "gemma3_270m": gemma3_270m,
    "llama3_2_1b": llama3_2_1b,
    "llama3_8b": llama3_8b,
}
