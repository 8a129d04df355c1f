"""Shared fixtures. 8 forced host devices so sharding tests run on a CPU mesh.

One persistent compilation cache serves the whole run: in-process tests, the
stage binaries they start (their `--compilation_cache=auto` reads
JAX_COMPILATION_CACHE_DIR) and pytest-xdist workers. Many tests compile the same tiny-model programs; the second one reads
them back. The directory is new for every run, so the suite's time is what a
clean clone costs, and it is removed at the end.
"""

import os
import shutil
import tempfile

# LLVM at -O0: the suite is compile-bound (tiny models), and -O0 compiles CPU programs
# in about 0.65x the time (tests/test_transformer.py, A/B alternated: 64 s vs 101 s,
# 50 s vs 73 s) while a run-bound test takes the same time (the real SmolLM2's greedy
# generation: 75 s both ways; matmuls are library calls either way). XLA's own passes, which decide the
# numerics, are unchanged: the parity tests hold at the same tolerances.
TEST_XLA_OPT = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_OPT}")
_OWN_CACHE = "CAI_JAX_TEST_JIT_CACHE" not in os.environ
if _OWN_CACHE:  # the first process (the xdist controller); workers inherit the variable
  os.environ["CAI_JAX_TEST_JIT_CACHE"] = tempfile.mkdtemp(prefix="cai_jax_test_jit_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["CAI_JAX_TEST_JIT_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cai_jax.checkpoints import hf  # noqa: E402
from cai_jax.model import config as model_config  # noqa: E402

# Seconds per file on 2 cores (pytest --junitxml of a whole run, summed per file by
# benchmarks/robustness/suite_time.py; their order is what counts): the longest go first,
# so the two xdist workers (--dist loadfile) end together instead of one running a long
# file alone at the end. pyproject's --no-loadscope-reorder keeps this order: by default
# xdist reorders files by their number of tests, which sent the one-test files (the tiny
# pipeline, 138 s) to the end.
FILE_SECONDS = {  # by file name: tests/ and tests/e2e/ hold no two of the same name
    # the 2026-12-07 23:45 run, less the two bundled-model gguf tests CI does not install
    # (p2: its real-model test since cut to 2 prompts with scanned layers, about -45 s)
    "test_p7_ppo.py": 315, "test_pipeline.py": 193, "test_sampler.py": 189,
    "test_p6_preference_model.py": 175, "test_transformer.py": 145,
    "test_gguf.py": 124, "test_p2_critique_revision.py": 100, "test_p3_sft.py": 101,
    "test_engine.py": 98, "test_packaging.py": 89, "test_bad_input.py": 88,
    "test_sft_step.py": 81, "test_resume.py": 80, "test_p7_dpo.py": 79,
    "test_prefix.py": 77, "test_dpo.py": 72, "test_memory_plan.py": 60,
    "test_labeler.py": 57, "test_preference_model.py": 55, "test_multihost.py": 54,
    "test_lora.py": 51, "test_sharding.py": 40, "test_p8_evaluation.py": 33,
    "test_packing.py": 33, "test_scoring.py": 26, "test_p5_ai_labels.py": 19,
    "test_losses.py": 11,
}


def pytest_collection_modifyitems(session, config, items):
  """The longest files first (each file's tests stay together and in order): with
  two xdist workers, a long file started last would leave one worker idle at the
  end. Files not in FILE_SECONDS follow, those with a slow test first."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: (-FILE_SECONDS.get(item.path.name, 0),
                               item.path not in slow_files))


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["CAI_JAX_TEST_JIT_CACHE"], ignore_errors=True)


TINY_PRESETS = {
    "llama": model_config.tiny_llama,
    "mistral": model_config.tiny_mistral,
    "qwen2": model_config.tiny_qwen2,
    "gemma3": model_config.tiny_gemma3,
}


# For code whose families differ only in their attention windows (attention paths, a
# sequence's independence of its batch under left padding): mistral (every layer
# sliding) and gemma3 (local and global layers, soft-capped logits); llama's and qwen2's
# plain causal layers are gemma3's global ones.
WINDOWED_FAMILIES = pytest.mark.parametrize("tiny_hf", ["gemma3", "mistral"], indirect=True)


def make_hf_model(cfg, seed: int = 0, weight_scale: float = 1.0):
  """A random transformers model of `cfg`'s architecture (the reference)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  fields = {k: v for k, v in hf.config_to_hf(cfg).items() if k != "architectures"}
  hf_cfg = transformers.AutoConfig.for_model(**fields)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(0.1 * torch.randn_like(p))  # not the identity, so a mix-up shows
      p.mul_(weight_scale)
  return model


@pytest.fixture(scope="session", params=sorted(TINY_PRESETS))
def tiny_hf(request, tmp_path_factory):
  """(family, transformers model, our cfg, our params) for each tiny family."""
  cfg = TINY_PRESETS[request.param]()
  model = make_hf_model(cfg, weight_scale=4.0)
  path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
  model.save_pretrained(path)
  loaded_cfg, params = hf.load_hf(path)
  return request.param, model, loaded_cfg, params


def left_pad(prompts, pad_id=0):
  T = max(len(p) for p in prompts)
  ids = np.full((len(prompts), T), pad_id, np.int64)
  mask = np.zeros((len(prompts), T), bool)
  for i, p in enumerate(prompts):
    ids[i, T - len(p):] = p
    mask[i, T - len(p):] = True
  return ids, mask


CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


TINY_CORPUS = ("Critique the response, then revise it to remove anything harmful.",
               "The quick brown fox jumps over the lazy dog. How do I bake bread?",
               "I cannot help with that, but here is a safer alternative.")


def train_tiny_tokenizer(vocab_size: int = 512, corpus=TINY_CORPUS):
  """A byte-level BPE with a ChatML template, trained in-process (SmolLM2 style)."""
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
  from cai_jax.text.tokenizer import Tokenizer
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  raw.train_from_iterator(list(corpus) * 20, trainer)
  return Tokenizer.from_tokenizers(raw, bos_token=None, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """A random tiny Llama with a real tokenizer, as a Hugging Face directory.

  Phases load it through the same `load_model` path as a real checkpoint.
  """
  import jax
  from cai_jax.model import transformer
  tok = train_tiny_tokenizer()
  cfg = model_config.tiny_llama(vocab_size=512, bos_token_id=None,
                                eos_token_ids=(0,), pad_token_id=0, max_seq_len=2048)
  params = transformer.init_params(cfg, jax.random.key(0))
  path = str(tmp_path_factory.mktemp("tiny_model") / "hf")
  hf.save_hf(params, cfg, path, tokenizer=tok)
  return path
