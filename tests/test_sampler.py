"""The jit sampler: parity with transformers.generate, caching, batching, buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.model import transformer
from cai_jax.sampling import sampler as sampler_lib
from cai_jax.sampling.sampler import Sampler, SamplingParams, sequence_keys
from conftest import TINY_PRESETS, left_pad

torch = pytest.importorskip("torch")

PROMPT_LENGTHS = (5, 11, 3, 17)


def _prompts(seed=1, lengths=PROMPT_LENGTHS):
  rs = np.random.RandomState(seed)
  return [list(rs.randint(3, 256, size=n)) for n in lengths]


@pytest.mark.parametrize("decode_layers", ["unrolled", "scan"])
def test_greedy_matches_transformers_generate(tiny_hf, decode_layers):
  family, model, cfg, params = tiny_hf
  prompts = _prompts()
  sampler = Sampler(cfg.replace(decode_layers=decode_layers), max_new_tokens=24, stop_ids=(),
                    pad_id=0)
  ours = sampler.generate(params, prompts, sequence_keys(0, range(len(prompts))))
  ids, mask = left_pad(prompts)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids),
                         attention_mask=torch.tensor(mask.astype(np.int64)),
                         max_new_tokens=24, do_sample=False, pad_token_id=0,
                         eos_token_id=None)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(ours.tokens, ref, err_msg=family)
  assert list(ours.lengths) == [24] * len(prompts)


@pytest.mark.parametrize("unstacked", [False, True], ids=["stacked", "unstacked"])
def test_cached_decode_equals_full_forward(tiny_hf, unstacked):
  """Logits of prefill + one-token cached steps == one full forward pass.

  Unstacked: the decode steps run on per-layer weights and cache (as the
  sampler's unrolled decode does), grown from a prefill cache of the prompt.
  """
  family, _, cfg, params = tiny_hf
  ids, mask = left_pad(_prompts(lengths=(6, 9)))
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  cont = jnp.asarray(np.random.RandomState(3).randint(3, 256, size=(2, 8)))
  full_ids = jnp.concatenate([ids, cont], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones_like(cont, bool)], axis=1)
  full, _ = transformer.forward(params, full_ids, cfg, mask_BT=full_mask)

  cache = transformer.init_cache(cfg, 2, ids.shape[1] if unstacked else full_ids.shape[1])
  pos = jnp.cumsum(mask, axis=1) - 1
  logits, cache = transformer.forward(params, ids, cfg, mask_BT=mask, positions_BT=pos,
                                      cache=cache)
  if unstacked:
    params = transformer.unstack_layers(params)
    cache = transformer.unstack_cache(cache, length=full_ids.shape[1])
  steps = [logits[:, -1]]
  next_pos = jnp.sum(mask, axis=1)
  step = jax.jit(lambda p, t, q, c: transformer.forward(p, t, cfg, positions_BT=q, cache=c))
  for t in range(cont.shape[1] - 1):
    logits, cache = step(params, cont[:, t:t + 1], (next_pos + t)[:, None], cache)
    steps.append(logits[:, 0])
  cached = jnp.stack(steps, axis=1)
  expected = full[:, ids.shape[1] - 1:-1]
  np.testing.assert_allclose(cached, expected, atol=1e-4, rtol=1e-4, err_msg=family)


def test_sequence_alone_equals_inside_batch(tiny_hf):
  """A sampled sequence depends on its key only, not batch-mates or batch size."""
  family, _, cfg, params = tiny_hf
  prompts = _prompts(seed=4, lengths=(7, 3, 12, 5, 9))
  keys = sequence_keys(123, range(len(prompts)))
  sampler = Sampler(cfg, max_new_tokens=16, stop_ids=(), pad_id=0)
  sampling = SamplingParams(temperature=1.0, top_k=50, top_p=0.95)
  batch = sampler.generate(params, prompts, keys, sampling)
  for i in (0, 2):
    alone = sampler.generate(params, [prompts[i]], keys[i:i + 1], sampling)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i], err_msg=family)
    np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=1e-4)


def test_logprobs_are_those_of_the_model():
  cfg = TINY_PRESETS["qwen2"]()
  params = transformer.init_params(cfg, jax.random.key(0))
  prompt = list(range(3, 10))
  sampler = Sampler(cfg, max_new_tokens=6, stop_ids=(), pad_id=0)
  sampling = SamplingParams(temperature=0.7)
  out = sampler.generate(params, [prompt], sequence_keys(0, [0]), sampling)
  seq = jnp.asarray([prompt + list(out.tokens[0])])
  logits, _ = transformer.forward(params, seq, cfg)
  logp = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1] / 0.7, axis=-1)
  expected = np.take_along_axis(np.asarray(logp), out.tokens[0][:, None], axis=-1)[:, 0]
  np.testing.assert_allclose(out.logprobs[0], expected, atol=1e-4)


def test_stop_tokens_end_sequences_and_pad():
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(1))
  prompts = _prompts(seed=5, lengths=(4, 8))
  free = Sampler(cfg, max_new_tokens=12, stop_ids=(), pad_id=0).generate(
      params, prompts, sequence_keys(0, [0, 1]))
  stop = int(free.tokens[0, 3])  # make row 0's 4th greedy token a stop token
  out = Sampler(cfg, max_new_tokens=12, stop_ids=(stop,), pad_id=0).generate(
      params, prompts, sequence_keys(0, [0, 1]))
  first = int(np.argmax(free.tokens[0] == stop))
  assert out.lengths[0] == first + 1
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert np.all(out.tokens[0, first + 1:] == 0)
  assert np.all(out.logprobs[0, first + 1:] == 0)


def test_top_k_one_and_tiny_top_p_are_greedy():
  cfg = TINY_PRESETS["gemma3"]()
  params = transformer.init_params(cfg, jax.random.key(2))
  prompts = _prompts(seed=6, lengths=(5, 9))
  keys = sequence_keys(7, [0, 1])
  sampler = Sampler(cfg, max_new_tokens=10, stop_ids=(), pad_id=0)
  greedy = sampler.generate(params, prompts, keys)
  for sampling in (SamplingParams(temperature=1.0, top_k=1),
                   SamplingParams(temperature=1.0, top_p=1e-6)):
    np.testing.assert_array_equal(sampler.generate(params, prompts, keys, sampling).tokens,
                                  greedy.tokens)


def test_same_bucket_does_not_recompile():
  cfg = TINY_PRESETS["llama"](max_seq_len=300)  # a config no other test uses
  params = transformer.init_params(cfg, jax.random.key(3))
  sampler = Sampler(cfg, max_new_tokens=4, stop_ids=(), pad_id=0)
  sampler.generate(params, _prompts(lengths=(3, 20)), sequence_keys(0, [0, 1]))
  assert sampler.num_traces() == 1
  # New lengths inside the same (32) bucket, batch of 2 -> same shapes.
  sampler.generate(params, _prompts(seed=9, lengths=(30, 17)), sequence_keys(1, [0, 1]))
  assert sampler.num_traces() == 1
  # A batch of 1 is a new batch bucket -> one more compile, then none.
  sampler.generate(params, _prompts(lengths=(20,)), sequence_keys(0, [0]))
  sampler.generate(params, _prompts(seed=2, lengths=(25,)), sequence_keys(0, [0]))
  assert sampler.num_traces() == 2
  # A new Sampler for the same model reuses the compiled function.
  again = Sampler(cfg, max_new_tokens=4, stop_ids=(), pad_id=0)
  again.generate(params, _prompts(lengths=(3, 20)), sequence_keys(0, [0, 1]))
  assert again.num_traces() == 2


def test_bad_inputs_give_clear_errors():
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(3))
  sampler = Sampler(cfg, max_new_tokens=4, stop_ids=(), pad_id=0)
  with pytest.raises(ValueError, match="empty prompt"):
    sampler.generate(params, [[]], sequence_keys(0, [0]))
  with pytest.raises(ValueError, match="max_seq_len"):
    sampler.generate(params, [[1] * 10_000], sequence_keys(0, [0]))
  with pytest.raises(ValueError, match="keys"):
    sampler.generate(params, [[1], [2]], sequence_keys(0, [0]))
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1.0)


def test_argmax_is_jnp_argmax_with_ties():
  x = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [-1.0, -2.0, -1.0, -5.0], [jnp.nan] * 4])
  np.testing.assert_array_equal(sampler_lib._argmax(x[:2]), jnp.argmax(x[:2], axis=-1))
  assert int(sampler_lib._argmax(x)[2]) == 3  # no maximum: a valid index, not V


def test_stacked_params_with_unstacked_cache_is_refused():
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(0))
  cache = transformer.unstack_cache(transformer.init_cache(cfg, 1, 4))
  with pytest.raises(ValueError, match="both be stacked or both unstacked"):
    transformer.forward(params, jnp.ones((1, 1), jnp.int32), cfg, cache=cache)
