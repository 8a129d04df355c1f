"""A shared prompt prefix prefilled once at batch 1 == every row prefilled whole.

Tiny random models; each check runs the prefix path and the plain path
(`min_shared_prefix=0`) on the same prompts and keys and asserts that the
prefix path was really taken (its trace counter and batch-1 prefill count).
"""

import jax
import numpy as np
import pytest

from cai_jax.feedback.scoring import OptionScorer
from cai_jax.model import transformer
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.sampling import prefix as prefix_lib
from cai_jax.sampling.sampler import Sampler, SamplingParams, sequence_keys
from conftest import TINY_PRESETS

BUCKETS = (16, 32, 64, 128)
PREFIX_LEN = 37  # not a bucket: the prefix is left-padded to 64 slots
SUFFIX_LENGTHS = (0, 5, 1, 30, 12)  # row 0 is the prefix alone: it keeps its last token
GREEDY = SamplingParams()
NUCLEUS = SamplingParams(temperature=0.7, top_p=0.9)


def _params(cfg, seed=0):
  """Random weights 3x the init scale, so that logits are far from uniform."""
  return jax.tree.map(lambda x: 3 * x, transformer.init_params(cfg, jax.random.key(seed)))


def _prompts(seed=0, prefix_len=PREFIX_LEN, suffix_lengths=SUFFIX_LENGTHS):
  rs = np.random.RandomState(seed)
  prefix = [int(t) for t in rs.randint(3, 256, size=prefix_len)]
  firsts = rs.permutation(np.arange(3, 256))  # suffixes start with distinct tokens
  return [prefix + ([int(firsts[i])] + [int(t) for t in rs.randint(3, 256, size=n - 1)] if n else [])
          for i, n in enumerate(suffix_lengths)]


def _samplers(cfg, max_new_tokens=12, sharder=None):
  kw = dict(max_new_tokens=max_new_tokens, stop_ids=(), pad_id=0, length_buckets=BUCKETS)
  return (Sampler(cfg, min_shared_prefix=8, sharder=sharder, **kw),
          Sampler(cfg, min_shared_prefix=0, **kw))


def _assert_same(got, want):
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)


def test_shared_prefix_length():
  rows = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4]]
  assert prefix_lib.shared_prefix_length(rows, 1) == 3
  assert prefix_lib.shared_prefix_length(rows, 4) == 0  # under the minimum
  assert prefix_lib.shared_prefix_length(rows, 0) == 0  # disabled
  assert prefix_lib.shared_prefix_length(rows, None) == 0
  assert prefix_lib.shared_prefix_length(rows[:1], 1) == 0  # one row: nothing to share
  # Identical rows keep their last token out of the prefix.
  assert prefix_lib.shared_prefix_length([[1, 2, 3], [1, 2, 3]], 1) == 2
  assert prefix_lib.shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]], 1) == 2
  assert prefix_lib.shared_prefix_length(_prompts(), 8) == PREFIX_LEN - 1  # row 0's last
  assert prefix_lib.shared_prefix_length(_prompts()[1:], 8) == PREFIX_LEN
  with pytest.raises(ValueError, match="min_shared_prefix"):
    Sampler(TINY_PRESETS["llama"](), max_new_tokens=4, stop_ids=(), pad_id=0,
            min_shared_prefix=-1)


@pytest.mark.parametrize("family,decode_layers,sampling", [
    ("llama", "unrolled", GREEDY), ("llama", "scan", NUCLEUS),
    ("gemma3", "unrolled", NUCLEUS), ("gemma3", "scan", GREEDY)],
    ids=["llama-unrolled-greedy", "llama-scan-nucleus", "gemma3-unrolled-nucleus",
         "gemma3-scan-greedy"])
def test_sampler_prefix_equals_whole_prompts(family, decode_layers, sampling):
  """Greedy and nucleus tokens identical, log-probs within 1e-5; gemma3 has sliding-window
  layers (window 6, far shorter than the prefix); 5 rows pad to a batch of 8."""
  cfg = TINY_PRESETS[family](decode_layers=decode_layers)
  params = _params(cfg)
  prompts = _prompts()
  keys = sequence_keys(5, range(len(prompts)))
  with_prefix, plain = _samplers(cfg)
  traces = with_prefix.num_prefix_traces(sampling)
  got = with_prefix.generate(params, prompts, keys, sampling)
  assert with_prefix.num_prefix_traces(sampling) == traces + 1
  assert with_prefix.prefix_cache.num_prefills == 1
  want = plain.generate(params, prompts, keys, sampling)
  assert plain.prefix_cache.num_prefills == 0
  _assert_same(got, want)


def test_prefix_cache_reused_while_prefix_and_params_are_the_same():
  """Same shapes as the llama-unrolled-greedy case above, so nothing new compiles."""
  cfg = TINY_PRESETS["llama"]()
  params = _params(cfg)
  with_prefix, plain = _samplers(cfg)
  keys = sequence_keys(0, range(5))
  first = _prompts(seed=1, suffix_lengths=(3, 30, 2, 24, 17))
  second = [first[0][:PREFIX_LEN] + p[PREFIX_LEN:] for p in
            _prompts(seed=2, suffix_lengths=(7, 1, 31, 4, 20))]  # the same prefix, new suffixes
  for prompts in (first, second):
    _assert_same(with_prefix.generate(params, prompts, keys),
                 plain.generate(params, prompts, keys))
    assert with_prefix.prefix_cache.num_prefills == 1
  # New weights under the same prefix: prefilled again, with the new weights.
  params2 = _params(cfg, seed=1)
  _assert_same(with_prefix.generate(params2, second, keys),
               plain.generate(params2, second, keys))
  assert with_prefix.prefix_cache.num_prefills == 2
  # Another prefix: prefilled again.
  third = _prompts(seed=3, suffix_lengths=(3, 30, 2, 24, 17))
  _assert_same(with_prefix.generate(params2, third, keys),
               plain.generate(params2, third, keys))
  assert with_prefix.prefix_cache.num_prefills == 3
  # Under the minimum (a 5-token prefix): the plain path.
  short = _prompts(seed=4, prefix_len=5, suffix_lengths=(3, 30, 2, 24, 17))
  with_prefix.generate(params2, short, keys)
  assert with_prefix.prefix_cache.num_prefills == 3


def test_sharded_prefix_sampling_equals_single_device():
  cfg = TINY_PRESETS["llama"]()
  params = _params(cfg)
  sharder = Sharder(make_mesh((2, 2, 2)))
  sharded = jax.device_put(params, transformer.param_shardings(cfg, sharder))
  prompts = _prompts(seed=6, suffix_lengths=(4, 9, 13, 2, 7, 5, 3, 11))
  keys = sequence_keys(0, range(len(prompts)))
  with_prefix, plain = _samplers(cfg, sharder=sharder)
  traces = with_prefix.num_prefix_traces(NUCLEUS)
  got = with_prefix.generate(sharded, prompts, keys, NUCLEUS)
  assert with_prefix.num_prefix_traces(NUCLEUS) == traces + 1
  _assert_same(got, plain.generate(params, prompts, keys, NUCLEUS))


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)], ids=["1-device", "mesh-2x2x2"])
def test_option_scorer_prefix_equals_whole_contexts(mesh_shape):
  """Two batches share one prefix (prefilled once), a last batch of one row takes the
  plain path; log-probs within 1e-5 of whole contexts."""
  cfg = TINY_PRESETS["gemma3"]()
  params = _params(cfg)
  sharder = None if mesh_shape is None else Sharder(make_mesh(mesh_shape))
  if sharder is not None:
    params = jax.device_put(params, transformer.param_shardings(cfg, sharder))
  contexts = _prompts(seed=7, suffix_lengths=(2, 5, 1, 30, 12, 8, 3, 20, 9))
  ids = [tuple(np.random.RandomState(i).randint(0, 256, size=2)) for i in range(len(contexts))]
  kw = dict(pad_id=0, batch_size=8 if sharder else 4, sharder=sharder, length_buckets=BUCKETS)
  with_prefix = OptionScorer(cfg, min_shared_prefix=8, **kw)
  traces = with_prefix.num_prefix_traces()
  got = with_prefix(params, contexts, ids)
  assert with_prefix.num_prefix_traces() > traces
  assert with_prefix.prefix_cache.num_prefills == 1
  want = OptionScorer(cfg, min_shared_prefix=0, **kw)(params, contexts, ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_workdirs_resume_under_any_prefix_setting_and_predate_the_reviser(tmp_path):
  """`min_shared_prefix` only changes speed (same tokens, tested above), so a stage
  directory resumes under any value, including one whose config predates the field.
  A field added later that changes results (`reviser`) compares as the value runs
  before it had, and a different value is refused, naming the field."""
  import json

  import ml_collections

  from cai_jax import records
  old = ml_collections.ConfigDict({"seed": 0, "model": "m"})
  (tmp_path / "config.json").write_text(old.to_json())
  (tmp_path / "shard-00000.jsonl").write_text("")
  new = ml_collections.ConfigDict({"seed": 0, "model": "m", "min_shared_prefix": 64,
                                   "reviser": ""})
  records.check_same_config(str(tmp_path), new)
  assert "min_shared_prefix" not in json.loads((tmp_path / "config.json").read_text())
  new.min_shared_prefix = 0
  records.check_same_config(str(tmp_path), new)
  new.reviser = "qwen2.5-coder-0.5b-instruct"
  with pytest.raises(ValueError, match=r"reviser.*reviser=''"):
    records.check_same_config(str(tmp_path), new)
  new.reviser, new.seed = "", 1
  with pytest.raises(ValueError, match=r"fields \['seed'\]"):
    records.check_same_config(str(tmp_path), new)
