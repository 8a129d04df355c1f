"""GGUF loading (checkpoints/gguf.py) and the conversion cache.

Fast tests write tiny GGUFs with `gguf.GGUFWriter` the way llama.cpp's
converter does (Q/K rows permuted for llama, Gemma norms stored as 1 + w,
Llama-3 RoPE scaling baked into rope_freqs.weight) and check that we read back
exactly the parameters we started from. Slow tests compare the real bundled
models against Hugging Face transformers' own GGUF loader.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import assets
from cai_jax.checkpoints import gguf as gguf_ckpt
from cai_jax.checkpoints import hf
from cai_jax.checkpoints.hf import CheckpointError
from cai_jax.checkpoints.load import load_model
from cai_jax.model import config as model_config
from cai_jax.model import transformer
from cai_jax.text.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

VOCAB = 320
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
EVERY_6TH = tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(6))

CASES = {
    # Llama-3 RoPE scaling (rope_freqs.weight), untied lm_head, permuted Q/K.
    "llama": lambda: model_config.tiny_llama(vocab_size=VOCAB),
    # q/k/v biases in a llama: the bias rows are permuted too.
    "llama_bias": lambda: model_config.tiny_llama(vocab_size=VOCAB, qkv_bias=True,
                                                  rope_scaling=None, tie_embeddings=True),
    "qwen2": lambda: model_config.tiny_qwen2(vocab_size=VOCAB),
    # Layer pattern given per layer in the metadata.
    "gemma3": lambda: model_config.tiny_gemma3(vocab_size=VOCAB),
    # No pattern in the metadata: llama.cpp's default, every 6th layer global.
    "gemma3_every6th": lambda: model_config.tiny_gemma3(vocab_size=VOCAB, num_layers=6,
                                                        layer_types=EVERY_6TH),
}

# llama.cpp tensor names, written out independently of the loader's table.
_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def _gguf_name(name: str, family: str) -> str:
  if name in _GGUF_GLOBAL:
    return _GGUF_GLOBAL[name]
  _, _, layer, rest = name.split(".", 3)
  module, kind = rest.rsplit(".", 1)
  if module == "post_attention_layernorm":
    part = "post_attention_norm" if family == "gemma3" else "ffn_norm"
  else:
    part = _GGUF_LAYER[module]
  return f"blk.{layer}.{part}.{kind}"


def _llama_cpp_permute(w, n_heads):
  """convert_hf_to_gguf.py's LlamaModel.permute."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _rope_freqs(cfg):
  """What llama.cpp writes to rope_freqs.weight: the divisor of each frequency."""
  base = transformer.rope_inv_freq(cfg.replace(rope_scaling=None), cfg.rope_theta)
  return (base / transformer.rope_inv_freq(cfg, cfg.rope_theta)).astype(np.float32)


def _random_params(cfg, seed=0):
  params = transformer.init_params(cfg, jax.random.key(seed))
  rs = np.random.RandomState(seed)
  # Non-trivial norms and biases, so a missing +-1 or permutation shows.
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.1 * rs.randn(*x.shape)
                                            .astype(np.float32)), params)


def _train_bpe():
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  raw.train_from_iterator(["Hello world! Critique the response, then revise it."] * 20,
                          trainer)
  return raw


def write_gguf(path, cfg, params, raw_tok=None, layer_pattern=None, arch=None):
  """A GGUF of `params` laid out as llama.cpp's convert_hf_to_gguf.py would."""
  arch = arch or cfg.family
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.dim)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_rope_dimension_count(cfg.head_dim)
  if cfg.family == "gemma3":
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    if layer_pattern is not None:
      w.add_sliding_window_pattern(layer_pattern)
  if cfg.bos_token_id is not None:
    w.add_bos_token_id(cfg.bos_token_id)
  w.add_eos_token_id(cfg.eos_token_ids[0])
  w.add_pad_token_id(cfg.pad_token_id)
  if raw_tok is not None:
    vocab = raw_tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(raw_tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_chat_template(CHATML)
  for name, arr in hf.iter_hf_tensors(params, cfg):
    arr = np.asarray(arr, np.float32)
    if cfg.family == "llama" and ".q_proj." in name:
      arr = _llama_cpp_permute(arr, cfg.num_heads)
    if cfg.family == "llama" and ".k_proj." in name:
      arr = _llama_cpp_permute(arr, cfg.num_kv_heads)
    if cfg.family == "gemma3" and name.endswith("norm.weight"):
      arr = arr + 1.0
    w.add_tensor(_gguf_name(name, cfg.family), np.ascontiguousarray(arr))
  if cfg.rope_scaling is not None:
    w.add_tensor("rope_freqs.weight", _rope_freqs(cfg))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def _assert_same_params(a, b, atol=0.0):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol,
                               err_msg=str(path))


def _logits(params, cfg, tokens):
  return np.asarray(transformer.forward(params, jnp.asarray(tokens), cfg)[0])


# --- Fast: tiny GGUFs -------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_gguf_matches_hf_tensors(case, tmp_path):
  cfg = CASES[case]()
  params = _random_params(cfg)
  pattern = [t == "local" for t in cfg.layer_types] if case == "gemma3" else None
  path = write_gguf(tmp_path / f"{case}.gguf", cfg, params, layer_pattern=pattern)

  got_cfg, got = gguf_ckpt.load_gguf(path)
  # The reference: the same tensors, HF-named, through the HF reader.
  ref = hf.params_from_tensors(hf.iter_hf_tensors(params, cfg), cfg)
  # Gemma norms went through (w + 1) - 1 in float32: one ulp of 1.0 apart.
  _assert_same_params(got, ref, atol=1.2e-7 if cfg.family == "gemma3" else 0.0)
  if cfg.rope_scaling is not None:  # fitted from rope_freqs up to a common scale
    np.testing.assert_allclose(transformer.rope_inv_freq(got_cfg, got_cfg.rope_theta),
                               transformer.rope_inv_freq(cfg, cfg.rope_theta), rtol=1e-6)
    got_cfg = got_cfg.replace(rope_scaling=cfg.rope_scaling)
  assert got_cfg == cfg
  tokens = np.random.RandomState(0).randint(0, VOCAB, size=(2, 11))
  np.testing.assert_allclose(_logits(got, got_cfg, tokens), _logits(ref, cfg, tokens),
                             rtol=0, atol=1e-5)


def test_permutation_round_trip():
  rs = np.random.RandomState(0)
  w, b = rs.randn(3 * 8, 5), rs.randn(3 * 8)
  for x in (w, b):
    assert not np.array_equal(_llama_cpp_permute(x, 3), x)
    np.testing.assert_array_equal(gguf_ckpt.unpermute_llama(_llama_cpp_permute(x, 3), 3), x)
    np.testing.assert_array_equal(gguf_ckpt.permute_llama(x, 3), _llama_cpp_permute(x, 3))


def test_gguf_errors(tmp_path):
  with pytest.raises(CheckpointError, match="no such GGUF"):
    gguf_ckpt.load_gguf(str(tmp_path / "missing.gguf"))
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf at all" * 10)
  with pytest.raises(CheckpointError, match="not a readable GGUF"):
    gguf_ckpt.load_gguf(str(bad))
  cfg = model_config.tiny_llama(vocab_size=VOCAB, rope_scaling=None)
  path = write_gguf(tmp_path / "phi.gguf", cfg, _random_params(cfg), arch="phi3")
  with pytest.raises(CheckpointError, match="'phi3' is not supported"):
    gguf_ckpt.load_gguf(path)


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory):
  cfg = CASES["llama"]()
  params = _random_params(cfg, seed=1)
  raw = _train_bpe()
  path = write_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", cfg, params, raw)
  return path, cfg, params, raw


def test_tokenizer_from_gguf(tiny_llama_gguf):
  path, _, _, raw = tiny_llama_gguf
  tok = Tokenizer.from_gguf(path)
  for text in ["Hello world!", "Critique the response.", "unseen wörds 123"]:
    assert tok.encode(text) == raw.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
  assert tok.bos_id == raw.token_to_id("<s>")
  assert tok.eos_ids == (raw.token_to_id("</s>"), raw.token_to_id("<|im_end|>"))
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_conversion_cache(tiny_llama_gguf, tmp_path):
  path, cfg, params, _ = tiny_llama_gguf
  root = str(tmp_path / "cache")
  out = gguf_ckpt.cached_hf_dir(path, root)
  assert out.startswith(os.path.join(root, "hf", "tiny-llama-"))
  assert {"config.json", "model.safetensors", "tokenizer.json",
          "cai_jax_source.json"} <= set(os.listdir(out))
  assert not [x for x in os.listdir(os.path.dirname(out)) if x.endswith(".tmp")]
  marker = os.path.join(out, "cai_jax_source.json")
  stamp = os.stat(marker).st_mtime_ns
  assert gguf_ckpt.cached_hf_dir(path, root) == out  # reused, not rewritten
  assert os.stat(marker).st_mtime_ns == stamp

  cached_cfg, cached = hf.load_hf(out)
  _assert_same_params(cached, hf.params_from_tensors(hf.iter_hf_tensors(params, cfg), cfg))
  np.testing.assert_allclose(transformer.rope_inv_freq(cached_cfg, cached_cfg.rope_theta),
                             transformer.rope_inv_freq(cfg, cfg.rope_theta), rtol=1e-6)

  os.utime(path, ns=(stamp, stamp + 10**9))  # a changed file gets a new entry
  assert gguf_ckpt.cached_hf_dir(path, root) != out


# --- Slow: the real bundled models against transformers --------------------------------------

REAL = {
    # asset: (max |logit diff| allowed, expected family)
    "smollm2-135m-instruct": (1e-3, "llama"),
    "qwen2.5-coder-0.5b-instruct": (1e-3, "qwen2"),
    "gemma3-270m": (2e-3, "gemma3"),
}
PROBE = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="session")
def real_cache():
  """The user's conversion cache ($CAI_JAX_CACHE, else ~/.cache/cai_jax), which the
  other real-model tests read too: each GGUF is converted once per machine, not once
  per test (the cache itself: `test_conversion_cache`)."""
  return assets.cache_root()


@pytest.fixture(scope="module")
def real_models(real_cache):
  """name -> ((cfg, params, tok) ours, the transformers model of the same GGUF), each
  loaded once for this file's real-model tests and let go after them."""
  loaded = {}

  def get(name):
    if name not in loaded:
      if not assets.is_available(name):
        pytest.skip(f"{name} not installed: {assets.get_asset(name).pip_command}")
      torch = pytest.importorskip("torch")
      transformers = pytest.importorskip("transformers")
      pytest.importorskip("accelerate")
      d, fname = os.path.split(assets.gguf_path(name, real_cache))
      loaded[name] = (load_model(name, cache_root=real_cache),
                      transformers.AutoModelForCausalLM.from_pretrained(
                          d, gguf_file=fname, dtype=torch.float32).eval())
    return loaded[name]

  yield get
  loaded.clear()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_matches_transformers(name, real_cache, real_models):
  (cfg, params, tok), model = real_models(name)
  import torch
  import transformers
  tol, family = REAL[name]
  asset = assets.get_asset(name)
  path = assets.gguf_path(name, real_cache)
  assert cfg.family == family

  d, fname = os.path.split(path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=fname)
  if asset.chat:
    prompt = tok.apply_chat_template(PROBE)
    assert prompt == hf_tok.apply_chat_template(
        [{"role": "system", "content": asset.system_prompt}] + PROBE if asset.system_prompt
        else PROBE, tokenize=False, add_generation_prompt=True)
    assert set(tok.eos_ids) <= set(cfg.eos_token_ids)
  else:
    prompt = "Question: What is the capital of France?\nAnswer:"
  for text in [prompt, "Héllo wörld — ünïcode, emoji 🙂, code `x = 1`"]:
    assert tok.encode(text) == hf_tok(text)["input_ids"], text
  ids = tok.encode(prompt)

  ours = _logits(params, cfg, np.asarray([ids]))[0]
  with torch.no_grad():
    ref = model(torch.tensor([ids])).logits[0].float().numpy()
  diff = np.abs(ours - ref).max()
  print(f"{name}: {len(ids)} tokens, max |logit diff| vs transformers {diff:.2e}")
  assert diff <= tol
  assert (ours.argmax(-1) == ref.argmax(-1)).all()

  # Our cached directory holds, under transformers' names, exactly the tensors
  # transformers' own GGUF reader produced (a tied lm_head is not stored twice).
  from safetensors.numpy import load_file
  cached_dir = gguf_ckpt.cached_dir_for(path, real_cache)
  saved = {}
  for f in sorted(os.listdir(cached_dir)):
    if f.endswith(".safetensors"):
      saved.update(load_file(os.path.join(cached_dir, f)))
  theirs = {k: v.float().numpy() for k, v in model.state_dict().items()}
  # ... and a config.json transformers reads as the architecture its GGUF reader built.
  ours_cfg = transformers.AutoConfig.from_pretrained(cached_dir).to_dict()
  ref_cfg = model.config.to_dict()
  for c in (ours_cfg, ref_cfg):  # head_dim left out means hidden_size / heads
    c["head_dim"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
  for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                "sliding_window", "max_position_embeddings"):
    want = ref_cfg.get(field)  # GGUF stores eps and theta as float32
    want = pytest.approx(want, rel=1e-6) if isinstance(want, float) else want
    assert ours_cfg.get(field) == want, (field, ours_cfg.get(field), ref_cfg.get(field))
  del model
  tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
  assert set(saved) <= set(theirs) and set(theirs) - set(saved) <= tied, (
      sorted(set(saved) ^ set(theirs))[:8])
  for k, v in saved.items():
    assert v.shape == theirs[k].shape, k
    np.testing.assert_allclose(v.astype(np.float32), theirs[k], rtol=1e-5, atol=1e-6, err_msg=k)


GREEDY_QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better at night, with a short reason for each one.",
    "Hi!",
    "Explain in two sentences why the sky looks blue during the day but red at sunset.",
]


@pytest.mark.slow
def test_real_smollm2_greedy_generation_matches_transformers(real_models):
  """32 greedy tokens of 4 left-padded prompts of different lengths: our sampler on the
  real SmolLM2-135M-Instruct weights against transformers' `generate` on the same GGUF."""
  import torch
  from cai_jax.sampling.sampler import Sampler, sequence_keys
  from cai_jax.text.chat import generation_ids
  from conftest import left_pad
  (cfg, params, tok), model = real_models("smollm2-135m-instruct")
  prompts = [generation_ids(tok, [{"role": "user", "content": q}]) for q in GREEDY_QUESTIONS]
  assert len({len(p) for p in prompts}) == 4, "prompts of different lengths"
  sampler = Sampler(cfg, max_new_tokens=32, stop_ids=(), pad_id=tok.pad_id)
  ours = sampler.generate(params, prompts, sequence_keys(0, range(4)))
  ids, mask = left_pad(prompts, tok.pad_id)
  model.generation_config.eos_token_id = None  # neither side stops at EOS: 32 tokens
  with torch.no_grad():
    ref = model.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
        max_new_tokens=32, do_sample=False,
        pad_token_id=tok.pad_id)[:, ids.shape[1]:].numpy()
  assert ref.shape == (4, 32)
  np.testing.assert_array_equal(ours.tokens, ref)
  answer = tok.decode(ours.tokens[0])
  assert "Paris" in answer, answer
