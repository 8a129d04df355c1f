"""Comparisons as token pairs (data/comparisons.py): rendering and batching, refusal
comparisons."""

import numpy as np
import pytest

from cai_jax import records
from cai_jax.data import comparisons

from test_preference_model import as_comparisons, marker_records, tok


def test_pairs_render_and_batch(tok):
  recs = marker_records(5, seed=0)
  comps = as_comparisons(recs)
  data = comparisons.tokenize_pairs(tok, comps, 64, "truncate")
  batch = comparisons.make_batch(data, np.asarray([3, -1, 0]), 64)
  assert batch["tokens"].shape == (3, 2, 64) and batch["p_a"].tolist()[1] == 0.5
  assert not batch["mask"][1].any() and not batch["valid"][1]
  end = tok.token_id("<|im_end|>")
  for row, i in ((0, 3), (2, 0)):
    for j, response in enumerate((comps[i].response_a, comps[i].response_b)):
      ids = batch["tokens"][row, j][batch["mask"][row, j]]
      assert ids[-1] == end  # the score's token ends the assistant turn
      assert response in tok.decode(ids)
    assert batch["p_a"][row] == comps[i].p_a
  # Too long: the start goes, the end-of-turn token stays.
  long = comparisons.Comparison("x", "helpful", "q" * 200, "answer A", "answer B", 1.0)
  cut = comparisons.tokenize_pairs(tok, [long], 32, "truncate")
  assert cut.lengths_E2.tolist() == [[32, 32]] and cut.tokens_E2T[0, 0, -1] == end
  assert tok.decode(cut.tokens_E2T[0, 0]).endswith("answer A")
  with pytest.raises(ValueError, match="more than data.seq_len"):
    comparisons.tokenize_pairs(tok, [long], 32, "error")


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
