"""Stage 7's reward sources (`rl.reward`): parsing, weights and running
normalisation against hand-computed values, the rule sources, and a stage-7 run
on weighted, normalised sources that resumes bit for bit."""

import numpy as np
import pytest

from cai_jax.phases import p7_ppo
from cai_jax.rl import reward as reward_lib
from cai_jax.text.tokenizer import Tokenizer
from test_ppo import tiny_config, write_prompts
from resume_helpers import tree_hashes


def constant(values):
  return lambda texts, tokens, lengths: np.asarray(values, np.float32)


def test_parse_sources():
  assert reward_lib.parse_sources("pm=1") == [("pm", 1.0)]
  assert reward_lib.parse_sources("pm=1, feedback=0.5,refusal") == [
      ("pm", 1.0), ("feedback", 0.5), ("refusal", 1.0)]
  for spec, message in (("pm=1,judge=2", "unknown source 'judge'"),
                        ("pm=x", "weight 'x' of 'pm' is not a number"),
                        ("pm=1,pm=2", "'pm' repeats"), ("pm=inf", "non-finite")):
    with pytest.raises(ValueError, match=f"reward.sources=.*{message}"):
      reward_lib.parse_sources(spec)


def test_weighted_sum_without_normalisation():
  r = reward_lib.WeightedReward([("pm", 2.0, constant([1.0, 3.0])),
                                 ("overlong", -0.5, constant([0.0, -1.0]))], normalize=False)
  np.testing.assert_allclose(r(["a", "b"], None, np.array([1, 2])), [2.0, 6.5])
  assert r.last == {"reward/pm": 2.0, "reward/overlong": -0.5}


def test_single_plain_source_is_passed_through_unchanged():
  values = np.array([0.1, 0.7], np.float32)
  r = reward_lib.WeightedReward([("pm", 1.0, constant(values))], normalize=False)
  out = r(["a", "b"], None, np.array([1, 1]))
  assert out.dtype == np.float32 and out.tobytes() == values.tobytes()


def test_running_normalisation_by_hand():
  batches = [[1.0, 2.0, 3.0], [10.0, 0.0, 5.0]]
  calls = iter(batches)
  r = reward_lib.WeightedReward([("pm", 3.0, lambda *a: np.asarray(next(calls)))],
                                normalize=True)
  seen = []
  for batch in batches:
    seen += batch
    mean, std = np.mean(seen), np.std(seen)  # every rollout so far, this one included
    want = 3.0 * (np.asarray(batch) - mean) / (std + reward_lib.NORM_EPS)
    np.testing.assert_allclose(r(["p"] * 3, None, np.ones(3)), want, rtol=1e-6)
  # The moments survive a checkpoint round trip (JSON floats) and go on the same way.
  again = reward_lib.WeightedReward([("pm", 3.0, constant([4.0, 4.0, 4.0]))], normalize=True)
  again.load_state(r.state())
  m = again.moments["pm"]
  assert (m.count, m.mean) == (6.0, np.mean(seen))
  np.testing.assert_allclose(m.std, np.std(seen))
  seen += [4.0] * 3
  np.testing.assert_allclose(again(["p"] * 3, None, np.ones(3)),
                             3.0 * (4.0 - np.mean(seen)) / (np.std(seen) + 1e-6), rtol=1e-6)


def test_overlong_and_refusal_rules(tiny_model_dir):
  overlong = reward_lib.overlong_reward_fn(after=8, max_new_tokens=16)
  np.testing.assert_allclose(overlong(None, None, np.array([4, 8, 12, 16])),
                             [0.0, 0.0, -0.5, -1.0])
  with pytest.raises(ValueError, match="reward.overlong_after=16"):
    reward_lib.overlong_reward_fn(after=16, max_new_tokens=16)
  tok = Tokenizer.from_dir(tiny_model_dir)
  texts = ["I'm sorry, but I can't help with that.", "Bake it at 200 C for 40 minutes."]
  ids = [tok.encode(t, add_bos=False) for t in texts]
  M = max(map(len, ids))
  tokens = np.array([i + [0] * (M - len(i)) for i in ids])
  lengths = np.array([len(i) for i in ids])
  refusal = reward_lib.refusal_reward_fn(tok, {"How do I bake bread?": "helpful",
                                               "How do I make a bomb?": "red_team"})
  prompts = ["How do I bake bread?"] * 2
  np.testing.assert_allclose(refusal(prompts, tokens, lengths), [-1.0, 0.0])
  # A refusal of a red-team prompt is not penalised.
  np.testing.assert_allclose(refusal(["How do I make a bomb?"] * 2, tokens, lengths), [0, 0])


def test_stage7_on_weighted_normalised_sources_resumes_bit_identically(tmp_path):
  """Two random PMs (pm and helpful_pm), the overlong and refusal rules, normalised:
  each source's mean is logged, and a run stopped after iteration 1 resumes to the
  same weights."""
  for d in ("full", "resumed"):
    write_prompts(str(tmp_path / d))
  c = tiny_config(iterations=3)
  c.reward.sources = "pm=1,helpful_pm=0.5,overlong=0.5,refusal=1"
  c.reward.helpful_pm, c.reward.normalize = "random:tiny_llama", True
  full = p7_ppo.run(c, str(tmp_path / "full"))
  part = p7_ppo.run(c, str(tmp_path / "resumed"), should_stop=lambda it: it == 1)
  assert part.status == "preempted"
  resumed = p7_ppo.run(c, str(tmp_path / "resumed"))
  assert tree_hashes(full.state.params) == tree_hashes(resumed.state.params)
  untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_s")}
  assert untimed(full.metrics) == untimed(resumed.metrics)
  assert {"reward/pm", "reward/helpful_pm", "reward/overlong", "reward/refusal"} <= set(
      full.metrics)
  # Two models, not one read twice (the second PM's key is folded from the first's).
  assert full.metrics["reward/pm"] != full.metrics["reward/helpful_pm"]


def test_helpful_pm_source_needs_its_directory(tmp_path):
  write_prompts(str(tmp_path))
  c = tiny_config(iterations=1)
  c.reward.sources = "pm=1,helpful_pm=1"
  with pytest.raises(ValueError, match="reward.helpful_pm is empty"):
    p7_ppo.run(c, str(tmp_path))


def test_pm_source_reads_ids_only_with_a_shared_tokenizer(tiny_model_dir):
  from cai_jax.checkpoints import load
  from cai_jax.model import config as model_config
  from cai_jax.preference.scorer import Scorer
  bpe, byte = Tokenizer.from_dir(tiny_model_dir), load.byte_tokenizer()
  assert reward_lib.shares_tokenizer(bpe, Tokenizer.from_dir(tiny_model_dir))
  assert not reward_lib.shares_tokenizer(bpe, byte)
  scorer = Scorer(model_config.tiny_llama(), None, byte, max_len=32)  # never called here
  with pytest.raises(ValueError, match="reward.pm_input='ids' but the PM's tokenizer differs"):
    reward_lib.pm_source(scorer, bpe, {}, "ids")
  with pytest.raises(ValueError, match="reward.pm_input='raw': use auto, ids or text"):
    reward_lib.pm_source(scorer, byte, {}, "raw")
  # auto: ids with the shared tokenizer, the text path otherwise (a closure of each).
  assert "pm_ids_reward_fn" in reward_lib.pm_source(scorer, byte, {}).__qualname__
  assert "pm_reward_fn" in reward_lib.pm_source(scorer, bpe, {}).__qualname__
  assert "pm_reward_fn" in reward_lib.pm_source(scorer, byte, {}, "text").__qualname__
