"""One entry point for every model source: `load_model(spec)`.

`spec` is, in the order tried:
  * a bundled asset name ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
    "gemma3-270m"; see `cai_jax.assets`), whose GGUF is converted once into the
    cache and whose defaults (system prompt) are applied to the tokenizer;
  * a Hugging Face model directory (config.json + safetensors + tokenizer);
  * a `.gguf` file, converted once into the cache (or read directly with
    cache=False);
  * a Hugging Face hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"), downloaded
    with `huggingface_hub` (needs network access; safetensors only);
  * "random:<preset>": a randomly initialised `cai_jax.model.config.PRESETS`
    entry (tests, smoke runs, benchmarks), with `tokenizer` = "bytes" (a
    261-id byte tokenizer with ChatML specials, built in memory) or a
    tokenizer path.
"""

from __future__ import annotations

import os
import re

import jax

from cai_jax import assets
from cai_jax.checkpoints import gguf as gguf_ckpt
from cai_jax.checkpoints.hf import CheckpointError, Params, load_hf
from cai_jax.model import config as model_config
from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.text.tokenizer import Tokenizer

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


def load_model(spec: str = assets.DEFAULT_ASSET, sharder: Sharder | None = None, *,
               cache: bool = True, cache_root: str | None = None,
               tokenizer: str = "bytes", key: jax.Array | None = None, **overrides
               ) -> tuple[ModelConfig, Params, Tokenizer]:
  """(config, params, tokenizer) for `spec` (see the module docstring).

  `tokenizer` and `key` matter only for "random:<preset>" (key default: key(0)).

  `overrides` replace ModelConfig fields (e.g. param_dtype="bfloat16"). The
  config's eos_token_ids are extended with the tokenizer's end-of-turn token
  (e.g. <|im_end|>), so sampling stops at the end of a chat turn.
  """
  if spec.startswith("random:"):
    tok = byte_tokenizer() if tokenizer == "bytes" else Tokenizer.load(tokenizer)
    key = jax.random.key(0) if key is None else key
    cfg, params = random_model(spec[len("random:"):], tok, sharder, key, **overrides)
    return cfg, params, tok
  system_prompt = None
  if spec in assets.ASSETS:
    asset = assets.get_asset(spec)
    system_prompt = asset.system_prompt
    path = assets.gguf_path(spec, cache_root)
  elif os.path.exists(spec):
    path = spec
  elif spec.endswith(".gguf"):
    raise CheckpointError(f"{spec}: no such GGUF file")
  elif _HUB_ID.match(spec):
    path = _download(spec)
  else:
    raise CheckpointError(
        f"{spec!r}: not a bundled asset ({sorted(assets.ASSETS)}), an existing"
        " directory or .gguf file, nor a Hugging Face hub id (owner/name)")

  if os.path.isdir(path):
    cfg, params = load_hf(path, sharder, **overrides)
    tok = Tokenizer.from_dir(path)
  elif path.endswith(".gguf") and not cache:
    cfg, params = gguf_ckpt.load_gguf(path, sharder, **overrides)
    tok = Tokenizer.from_gguf(path)
  elif path.endswith(".gguf"):
    hf_dir = gguf_ckpt.cached_hf_dir(path, cache_root)
    cfg, params = load_hf(hf_dir, sharder, **overrides)
    tok = Tokenizer.from_dir(hf_dir)
  else:
    raise CheckpointError(f"{path}: expected a Hugging Face directory or a .gguf file")
  if system_prompt is not None:
    tok = tok.with_system_prompt(system_prompt)
  if "eos_token_ids" not in overrides:
    eos = tuple(dict.fromkeys(cfg.eos_token_ids + tok.eos_ids))
    cfg = cfg.replace(eos_token_ids=eos)
  return cfg, params, tok


def _download(repo_id: str) -> str:
  """snapshot_download of the safetensors + tokenizer files; clear error offline."""
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise CheckpointError(f"{repo_id}: looks like a hub id but huggingface_hub is not"
                          " installed (pip install huggingface_hub)") from None
  try:
    return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
  except Exception as e:  # offline, gated, missing: all end here
    raise CheckpointError(
        f"{repo_id}: could not download from the Hugging Face hub ({type(e).__name__}:"
        f" {e}). Without network access pass a local directory, a .gguf file or a"
        f" bundled asset ({sorted(assets.ASSETS)}); for gated models run"
        " `huggingface-cli login` first") from e


# --- Random models ----------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")


def byte_tokenizer() -> Tokenizer:
  """Bytes as tokens plus ChatML specials: 261 ids, no training, no files.

  Ids 0-4 are <pad> <s> </s> <|im_start|> <|im_end|>, matching the tiny
  presets' pad/bos/eos ids.
  """
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers
  specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
  raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  raw.decoder = decoders.ByteLevel()
  raw.add_special_tokens(specials)
  return Tokenizer.from_tokenizers(raw, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHATML)


def random_model(preset: str, tok: Tokenizer, sharder: Sharder | None, key: jax.Array,
                 **overrides) -> tuple[ModelConfig, Params]:
  """A random `preset` model sized to `tok` (vocab rounded up to a multiple of 8)."""
  if preset not in model_config.PRESETS:
    raise ValueError(f"random:{preset}: unknown preset; have {sorted(model_config.PRESETS)}")
  cfg = model_config.PRESETS[preset](**overrides)
  vocab = max(cfg.vocab_size, -(-tok.vocab_size // 8) * 8)
  cfg = cfg.replace(vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids,
                    pad_token_id=tok.pad_id)
  if sharder is None:
    return cfg, transformer.init_params(cfg, key)
  return cfg, transformer.init_params_sharded(cfg, key, sharder)
