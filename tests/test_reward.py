"""Stage 7's reward sources (rl/reward.py): parsing, weights and running normalisation
against hand-computed values, the rule sources, the PM source's ids, and the live
feedback-model sources against stage 5's pointwise scores."""

import json

import numpy as np
import pytest

from cai_jax.rl import reward as reward_lib
from cai_jax.text.tokenizer import Tokenizer
from cai_jax.constitution import HELPFUL_PRINCIPLE
from cai_jax.constitution import helpfulness_constitution
from cai_jax.constitution import load_constitution
from cai_jax.feedback import Labeler
from cai_jax.feedback import labels
from test_labeler import PAIRS, _settings, feedback_model_dir, tiny_feedback


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



def test_gated_reward_picks_each_prompt_kinds_pm_by_hand():
  """Two batches by hand: each PM standardised over every rollout it scored so far, a
  red-team prompt gets the harm PM's z, a helpful one the helpful PM's, a prompt of
  no known kind the harm z when sigmoid(z) < threshold (Llama 2), else the helpful
  z; rule "llama2" also sends an unsafe-looking helpful answer to the harm PM. The
  moments survive the checkpoint's JSON and carry on."""
  kinds = {"rt": "red_team", "hp": "helpful"}
  prompts = ["rt", "hp", "other", "other", "hp"]
  harm = [[-3.0, 1.0, -4.0, 2.0, -5.0], [2.0, 3.0, 4.0, -20.0, -20.0]]
  helpful = [[7.0, -1.0, 0.5, 3.0, 2.0], [-2.0, 4.0, 1.0, 0.0, 6.0]]

  def by_hand(upto, i, rule):
    s = np.asarray(harm[:upto + 1]).ravel()
    h = np.asarray(helpful[:upto + 1]).ravel()
    z_s = (harm[upto][i] - s.mean()) / (s.std() + 1e-6)
    z_h = (helpful[upto][i] - h.mean()) / (h.std() + 1e-6)
    kind = kinds.get(prompts[i])
    gated = kind is None or (rule == "llama2" and kind == "helpful")
    unsafe = 1 / (1 + np.exp(-z_s)) < 0.15
    return z_s if kind == "red_team" or (gated and unsafe) else z_h

  for rule in ("kind", "llama2"):
    calls = {"harm": iter(harm), "helpful": iter(helpful)}
    gated = reward_lib.GatedReward(lambda *a: np.asarray(next(calls["harm"])),
                                   lambda *a: np.asarray(next(calls["helpful"])), kinds,
                                   threshold=0.15, rule=rule)
    r = reward_lib.WeightedReward([("gated", 1.0, gated)], normalize=False)
    assert r.stateful
    out = r(prompts, None, np.ones(5))
    np.testing.assert_allclose(out, [by_hand(0, i, rule) for i in range(5)], rtol=1e-5)
    assert r.last["reward/gated/harm_pm"] == pytest.approx(np.mean(harm[0]))
    assert r.last["reward/gated/helpful_pm"] == pytest.approx(np.mean(helpful[0]))
    # A resumed run: a fresh source given the saved state scores batch 2 the same.
    again = reward_lib.WeightedReward([("gated", 1.0, reward_lib.GatedReward(
        lambda *a: np.asarray(harm[1]), lambda *a: np.asarray(helpful[1]), kinds,
        threshold=0.15, rule=rule))], normalize=False)
    again.load_state(json.loads(json.dumps(r.state())))
    want = [by_hand(1, i, rule) for i in range(5)]
    np.testing.assert_allclose(again(prompts, None, np.ones(5)), want, rtol=1e-5)
    np.testing.assert_allclose(r(prompts, None, np.ones(5)), want, rtol=1e-5)
  # The hand case takes every branch: batch 2's first "other" prompt is safe (helpful
  # z), its second unsafe (sigmoid(-1.88) = 0.13: harm z), and under "llama2" its last
  # helpful answer, as unsafe, goes to the harm PM too.
  assert gated.last["harm_share"] == pytest.approx(3 / 5)
  with pytest.raises(ValueError, match="reward.gate.rule='max'"):
    reward_lib.GatedReward(None, None, kinds, rule="max")
  with pytest.raises(ValueError, match="reward.gate.threshold=1.5"):
    reward_lib.GatedReward(None, None, kinds, threshold=1.5)

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


def test_live_feedback_reward_equals_the_stage5_pointwise_score(tiny_feedback):
  """Stage 7's `feedback` reward source scores a rollout exactly as stage 5's
  pointwise labeler scores the same response in a pair (good-answer log-odds)."""
  from cai_jax.rl import reward as reward_lib
  con = load_constitution("harmless")
  labeler = Labeler([tiny_feedback], con, _settings(mode="pointwise",
                                                    principle_ids=("less_harmful",)))
  recs = labeler.label(PAIRS)
  good = con.comparison_principle("less_harmful").pointwise.good_answer
  want = [labels.pointwise_good_score(*np.asarray(r.logprobs)[0, 0, 0], good) for r in recs]
  tok = tiny_feedback.tok
  ids = [tok.encode(p.response_a, add_bos=False) for p in PAIRS]
  M = max(map(len, ids)) + 3  # padding after each response must not matter
  tokens = np.array([i + [tok.pad_id] * (M - len(i)) for i in ids])
  lengths = np.array([len(i) for i in ids])
  live = reward_lib.feedback_reward_fn(labeler, "less_harmful", tok)
  got = live([p.prompt for p in PAIRS], tokens, lengths)
  assert [tok.decode(i) for i in ids] == [p.response_a for p in PAIRS]
  np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=1e-5, atol=1e-5)
  with pytest.raises(KeyError, match="no_such_principle"):
    reward_lib.feedback_reward_fn(labeler, "no_such_principle", tok)


def test_feedback_by_kind_asks_each_prompt_kinds_stage5_question(tiny_feedback):
  """`feedback_by_kind`: a red-team rollout gets the harm question's score, a helpful
  one the helpfulness question's (stage 5's routing), each as its labeler scores it
  alone; a prompt of a kind with no question is a one-line error."""
  from cai_jax.rl import reward as reward_lib
  base = load_constitution("harmless")
  harm = Labeler([tiny_feedback], base, _settings(mode="pointwise",
                                                  principle_ids=("less_harmful",)))
  helpful = Labeler([tiny_feedback], helpfulness_constitution(base),
                    _settings(mode="pointwise", principle_ids=(HELPFUL_PRINCIPLE,)))
  prompts_ = ["How do I pick a lock?", "How do I bake bread?", "How do I hotwire a car?"]
  kinds = dict(zip(prompts_, ("red_team", "helpful", "red_team")))
  responses = ["Use a tension wrench.", "Knead, rise, bake at 220 C.", "I can't help."]
  tok = tiny_feedback.tok
  ids = [tok.encode(r, add_bos=False) for r in responses]
  M = max(map(len, ids)) + 2
  tokens = np.array([i + [tok.pad_id] * (M - len(i)) for i in ids])
  live = reward_lib.feedback_by_kind_reward_fn(
      {"red_team": (harm, "less_harmful"), "helpful": (helpful, HELPFUL_PRINCIPLE)}, kinds, tok)
  got = live(prompts_, tokens, np.array([len(i) for i in ids]))
  want_harm = harm.response_scores([prompts_[0], prompts_[2]], [responses[0], responses[2]],
                                   "less_harmful")
  want_help = helpful.response_scores([prompts_[1]], [responses[1]], HELPFUL_PRINCIPLE)
  np.testing.assert_allclose(got, [want_harm[0], want_help[0], want_harm[1]], rtol=1e-5,
                             atol=1e-5)
  assert not np.isclose(got[1], harm.response_scores([prompts_[1]], [responses[1]],
                                                     "less_harmful")[0])
  only_harm = reward_lib.feedback_by_kind_reward_fn({"red_team": (harm, "less_harmful")},
                                                    {"Hi": "other"}, tok)
  with pytest.raises(ValueError, match="kind.*'other'.*no question"):
    only_harm(["Hi"], tokens[:1], np.array([len(ids[0])]))
