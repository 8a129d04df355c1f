"""The continuous-batching engine (sampling/engine.py) against the static sampler it must
reproduce (itself checked against transformers.generate in test_sampler.py): the same
tokens and log-probs for more requests than slots, whatever the slot and neighbours, runs
bit-identical, K samples of one prompt from one prefill, per-request lengths and stops,
no recompiles for a new workload; and the per-row cache writes it rests on against the
shared-index ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.model import transformer
from cai_jax.sampling.engine import Engine
from cai_jax.sampling.sampler import Sampler, SamplingParams, sequence_keys
from conftest import TINY_PRESETS

SAMPLED = SamplingParams(temperature=1.0, top_k=50, top_p=0.95)
LENGTHS = (5, 11, 3, 17, 8, 2, 9, 14, 6, 4, 12)
M = 12


def _prompts(seed=0, lengths=LENGTHS):
  rs = np.random.RandomState(seed)
  return [list(rs.randint(3, 256, size=n)) for n in lengths]


def _model(family="llama"):
  cfg = TINY_PRESETS[family]()
  return cfg, transformer.init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def model():
  return _model()


def _static(cfg, params, prompts, keys, sampling, stop_ids=()):
  return Sampler(cfg, max_new_tokens=M, stop_ids=stop_ids, pad_id=0).generate(
      params, prompts, keys, sampling)


@pytest.mark.parametrize("family,sampling", [("llama", SamplingParams()), ("qwen2", SAMPLED)],
                         ids=["llama-greedy", "qwen2-sampled"])
def test_more_requests_than_slots_give_the_static_samplers_tokens(family, sampling):
  # 11 requests of mixed prompt and output lengths through 4 slots (several refills, a
  # request of one token, prompts in two length buckets).
  cfg, params = _model(family)
  prompts, keys = _prompts(), sequence_keys(7, range(len(LENGTHS)))
  limits = [M, 3, M, 7, M, 1, M, 5, M, M, 2]
  want = _static(cfg, params, prompts, keys, sampling)
  eng = Engine(cfg, slots=4, max_new_tokens=M, stop_ids=(), pad_id=0, steps_per_call=5)
  got = eng.generate(params, prompts, keys, sampling, limits)
  np.testing.assert_array_equal(got.lengths, limits)
  for i, m in enumerate(limits):
    np.testing.assert_array_equal(got.tokens[i, :m], want.tokens[i, :m], err_msg=str(i))
    np.testing.assert_allclose(got.logprobs[i, :m], want.logprobs[i, :m], atol=1e-4)
    assert np.all(got.tokens[i, m:] == 0) and np.all(got.logprobs[i, m:] == 0)
  # Slots were refilled: fewer decode steps than a static batch of 4 would take.
  assert eng.stats.prefills > 1
  assert eng.stats.busy_slot_steps == sum(m - 1 for m in limits)


def test_a_requests_tokens_do_not_depend_on_its_slot_or_neighbours(model):
  cfg, params = model
  prompts, keys = _prompts(seed=3), sequence_keys(11, range(len(LENGTHS)))
  a = Engine(cfg, slots=4, max_new_tokens=M, stop_ids=(), pad_id=0).generate(
      params, prompts, keys, SAMPLED)
  order = np.random.RandomState(0).permutation(len(prompts))
  # Another order (other neighbours, other slots) and refills at other steps; the same
  # slot count keeps the compiled shapes (and the test's time) of the first run.
  b = Engine(cfg, slots=4, max_new_tokens=M, stop_ids=(), pad_id=0, steps_per_call=3).generate(
      params, [prompts[i] for i in order], keys[order], SAMPLED)
  np.testing.assert_array_equal(b.tokens, a.tokens[order])
  np.testing.assert_allclose(b.logprobs, a.logprobs[order], atol=1e-4)


def test_two_runs_are_bit_identical(model):
  cfg, params = model
  prompts, keys = _prompts(seed=5), sequence_keys(2, range(len(LENGTHS)))
  eng = Engine(cfg, slots=4, max_new_tokens=M, stop_ids=(), pad_id=0)
  a = eng.generate(params, prompts, keys, SAMPLED)
  b = eng.generate(params, prompts, keys, SAMPLED)
  for field in ("tokens", "logprobs", "lengths"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_k_samples_of_one_prompt_share_a_prefill_and_equal_k_requests():
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(1))
  prompt = _prompts(seed=9, lengths=(7,))[0]
  keys = sequence_keys(5, range(4))
  eng = Engine(cfg, slots=4, max_new_tokens=M, stop_ids=(), pad_id=0)
  got = eng.generate(params, [prompt] * 4, keys, SAMPLED)
  assert eng.stats.prefills == 1 and eng.stats.prefill_rows == 1  # one prompt row
  want = _static(cfg, params, [prompt] * 4, keys, SAMPLED)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert len({tuple(t) for t in got.tokens}) > 1  # four keys, four different samples


def test_stop_tokens_end_sequences_and_free_their_slots():
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(1))
  prompts, keys = _prompts(seed=5, lengths=(4, 8, 6)), sequence_keys(0, range(3))
  free = _static(cfg, params, prompts, keys, SamplingParams())
  stop = int(free.tokens[0, 3])  # row 0's 4th greedy token becomes a stop token
  want = _static(cfg, params, prompts, keys, SamplingParams(), stop_ids=(stop,))
  got = Engine(cfg, slots=2, max_new_tokens=M, stop_ids=(stop,), pad_id=0).generate(
      params, prompts, keys)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert got.lengths[0] <= 4


def test_a_new_workload_in_the_same_bucket_does_not_recompile():
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(2))
  eng = Engine(cfg, slots=4, max_new_tokens=8, stop_ids=(), pad_id=0)
  eng.generate(params, _prompts(seed=1, lengths=(9, 12, 3, 5, 10)), sequence_keys(0, range(5)))
  before = eng.num_traces()
  eng.generate(params, _prompts(seed=2, lengths=(13, 4, 11, 7, 2)), sequence_keys(1, range(5)))
  assert eng.num_traces() == before


def test_bad_requests_give_clear_errors():
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(2))
  eng = Engine(cfg, slots=2, max_new_tokens=8, stop_ids=(), pad_id=0)
  with pytest.raises(ValueError, match=r"max_new_tokens needs 2 values in \[1, 8\]"):
    eng.generate(params, [[3, 4], [5]], sequence_keys(0, range(2)), max_new_tokens=[8, 9])
  with pytest.raises(ValueError, match="empty prompt"):
    eng.generate(params, [[3, 4], []], sequence_keys(0, range(2)))
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
    eng.generate(params, [[3] * cfg.max_seq_len], sequence_keys(0, range(1)))


@pytest.mark.parametrize("unrolled", [False, True], ids=["scan", "unrolled"])
def test_per_row_cache_writes_equal_shared_index_writes(unrolled):
  # The engine's cache: each row writes at its own slot. With every row at the same slot
  # it must equal the shared-index cache, in both layer layouts.
  cfg = TINY_PRESETS["llama"]()
  params = transformer.init_params(cfg, jax.random.key(3))
  B, T, S = 3, 5, 12
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 256, size=(B, T)))
  cache = transformer.init_cache(cfg, B, S)
  _, cache = transformer.hidden_states(params, tokens, cfg, cache=cache)
  nxt = tokens[:, :1]
  pos = jnp.full((B, 1), T)
  if unrolled:
    params, cache = transformer.unstack_layers(params), transformer.unstack_cache(cache)
  shared_h, shared_c = transformer.hidden_states(params, nxt, cfg, positions_BT=pos,
                                                 cache=cache)
  per_row = dict(cache, index=jnp.full((B,), T, jnp.int32))
  row_h, row_c = transformer.hidden_states(params, nxt, cfg, positions_BT=pos, cache=per_row)
  np.testing.assert_allclose(row_h, shared_h, atol=1e-6)
  for a, b in zip(jax.tree.leaves(row_c["k"]), jax.tree.leaves(shared_c["k"])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(row_c["pos"], shared_c["pos"])
  np.testing.assert_array_equal(row_c["index"], [T + 1] * B)


def test_chat_model_with_engine_slots_writes_the_static_samplers_texts(tiny_model_dir):
  # The stages' switch (`engine_slots`, stage 8's answers): the same text per named
  # sequence as the static sampler, with the tiny model's real tokenizer and stop token.
  import ml_collections
  from cai_jax.model.sharding import Sharder, make_mesh
  from cai_jax.sampling.chat import ChatModel
  from cai_jax.text.chat import user_turn
  config = ml_collections.ConfigDict({
      "dtype": "float32", "decode_layers": "unrolled", "max_new_tokens": 10,
      "max_prompt_tokens": 256, "seed": 3, "engine_slots": 0,
      "sampling": {"temperature": 0.7, "top_k": 0, "top_p": 0.9}})
  sharder = Sharder(make_mesh((1, 1, 1), jax.devices()[:1]))
  convs = [user_turn(p) for p in ("Hi there", "Name three colours please", "Why?",
                                  "Tell me a story about a cat", "Count to five")]
  names = [f"p{i}/answer" for i in range(len(convs))]
  static = ChatModel(tiny_model_dir, sharder, config).generate(convs, names)
  config.engine_slots = 2
  engine = ChatModel(tiny_model_dir, sharder, config)
  assert isinstance(engine.sampler, Engine)
  assert engine.generate(convs, names) == static
  # A stage killed after its first shard regenerates only the rest, with other neighbours
  # and slots: the same texts as the uninterrupted run (the records resume identically).
  assert engine.generate(convs[2:], names[2:]) == static[2:]


def test_slots_split_over_eight_devices_equal_one_device():
  # The slots spread over the mesh's batch axis (8 forced CPU devices) sample what one
  # device samples; the slot count must be a multiple of the batch shards.
  from cai_jax.model.sharding import Sharder, make_mesh
  if len(jax.devices()) < 8:
    pytest.skip("needs the 8 forced CPU devices")
  cfg, params = _model()
  sharder = Sharder(make_mesh((-1, 1, 1)))
  prompts, keys = _prompts(seed=6), sequence_keys(4, range(len(LENGTHS)))
  limits = [M, 3, M, 7, M, 1, M, 5, M, M, 2]
  one = Engine(cfg, slots=8, max_new_tokens=M, stop_ids=(), pad_id=0).generate(
      params, prompts, keys, SAMPLED, limits)
  sharded_params = jax.device_put(params, transformer.param_shardings(cfg, sharder))
  eight = Engine(cfg, slots=8, max_new_tokens=M, stop_ids=(), pad_id=0, sharder=sharder,
                 steps_per_call=4).generate(sharded_params, prompts, keys, SAMPLED, limits)
  np.testing.assert_array_equal(eight.tokens, one.tokens)
  np.testing.assert_array_equal(eight.lengths, one.lengths)
  np.testing.assert_allclose(eight.logprobs, one.logprobs, atol=1e-4)
  with pytest.raises(ValueError, match="multiple of the mesh's 8 batch shards"):
    Engine(cfg, slots=4, max_new_tokens=4, stop_ids=(), pad_id=0, sharder=sharder)
