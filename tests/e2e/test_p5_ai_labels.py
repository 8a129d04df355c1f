"""Stages 4-5 end to end: response pairs and their AI labels, killed and resumed; revision
and refusal pairs."""


import numpy as np
import pytest

from cai_jax import paths, records
from cai_jax.constitution import HELPFUL_PRINCIPLE
from cai_jax.data import prompts as prompt_data
from cai_jax.data import refusals
from cai_jax.phases import p4_pairs, p5_ai_labels

from configs import ai_labels as labels_config
from configs import pairs as pairs_config
from resume_helpers import killed_after_one_shard, shard_bytes
from test_labeler import _sigmoid


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
    # The record's soft label is the labeler's: the principle mean of the two orders'
    # normalised option probabilities, from the raw log-probs the record keeps.
    per_principle = [_sigmoid(((lp[0][0] - lp[0][1]) + (lp[1][1] - lp[1][0])) / 2)
                     for lp in np.asarray(r.logprobs)[0]]
    assert r.p_a == pytest.approx(np.mean(per_principle), abs=1e-6)


  # Killed after one shard, then resumed: the same bytes, for both stages.
  with killed_after_one_shard(monkeypatch):
    p4_pairs.run(_pairs_config(tiny_model_dir), str(killed))
  with pytest.raises(ValueError, match="stage 4 is incomplete"):
    p5_ai_labels.run(_labels_config(tiny_model_dir), str(killed))
  p4_pairs.run(_pairs_config(tiny_model_dir), str(killed))
  assert shard_bytes(paths.stage_dir(str(killed), paths.PAIRS)) == shard_bytes(pairs_out)

  with killed_after_one_shard(monkeypatch):
    p5_ai_labels.run(_labels_config(tiny_model_dir), str(killed))
  out = paths.stage_dir(str(killed), paths.AI_LABELS)
  assert len(records.completed_shards(out)) == 1
  p5_ai_labels.run(_labels_config(tiny_model_dir), str(killed))
  assert shard_bytes(out) == shard_bytes(labels_out)
  with pytest.raises(ValueError, match="different config"):
    p5_ai_labels.run(_labels_config(tiny_model_dir, num_principles=3), str(killed))


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
