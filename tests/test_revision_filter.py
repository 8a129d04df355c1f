"""SL-CAI's targets (evaluation/revision_filter.py): each drop reason on a revision of the
kind a small reviser writes, the summary's shares by hand, and stage 3 training only on
what the filter keeps."""

import json
import os

import ml_collections
import pytest

from cai_jax import records
from cai_jax.evaluation import revision_filter as rf

REQUEST = ("Rewrite the response to remove harmful content, explaining clearly any part you"
           " will not help with and why.")
PROMPT = "How can I build a homemade firearm in my garage?"
INITIAL = "Sure! First, buy a barrel blank and a drill press."


@pytest.fixture(scope="module")
def flt():
  return rf.RevisionFilter(rf.FilterConfig(True), [REQUEST])


@pytest.mark.parametrize("revision,reason", [
    ("   ", "empty"),
    ("One-to-One-" * 40, "degenerate"),  # the reviser's loop, to the end of its tokens
    ("I will be explaining clearly any part you will not help with and why, as asked.",
     "echoes_request"),
    ("Sure!  First, buy a barrel blank\nand a drill press.", "unchanged"),  # whitespace only
    ("Paris is the capital of France and has many museums.", "off_topic"),
    ("I can't help with building a firearm at home because it is dangerous and often"
     " illegal; a licensed gunsmith or a safety course is a better place to start.", None),
])
def test_each_reason(flt, revision, reason):
  assert flt.reason(PROMPT, INITIAL, revision) == reason


def test_categories_keep_only_what_is_asked():
  strict = rf.RevisionFilter(rf.FilterConfig(True, ("refuses_explains",)), [REQUEST])
  bare = "I can't help with that."
  explains = "I can't help with that because homemade firearms are dangerous and illegal."
  assert strict.reason(PROMPT, INITIAL, bare) == "category"
  assert strict.reason(PROMPT, INITIAL, explains) is None
  with pytest.raises(ValueError, match="revision_filter.categories: unknown"):
    rf.FilterConfig(True, ("refuses_politely",))


def test_compression_separates_prose_from_a_loop():
  prose = ("A firearm needs a licence in most countries. Building one at home is regulated,"
           " and a safety course teaches handling, storage and the law where you live.")
  assert rf.compression(prose) > 0.5 > 0.2 > rf.compression("One-to-One-" * 40)


def test_summary_counts_by_hand():
  s = rf.summary([(None, "refuses_explains"), (None, "refuses"), (None, "refuses"),
                  ("degenerate", "complies"), ("echoes_request", "refuses")])
  assert s["revisions"] == 5 and s["kept"] == 3 and s["kept_share"] == pytest.approx(0.6)
  assert s["dropped_by_reason"]["degenerate"] == 1 and s["dropped_by_reason"]["empty"] == 0
  assert s["kept_categories"] == pytest.approx({"refuses": 2 / 3, "refuses_explains": 1 / 3})
  assert s["dropped_categories"] == pytest.approx({"complies": 0.5, "refuses": 0.5})


def test_stage3_trains_only_on_kept_revisions_and_writes_the_summary(tmp_path):
  from cai_jax.configs import sft as sft_config
  from cai_jax.data import sft
  from cai_jax.phases import p3_sft
  good = ("I can't help with building a firearm at home because it is dangerous and often"
          " illegal; a licensed gunsmith or a safety course is a better place to start.")
  rec = lambda i, kind, revision: records.CritiqueRevisionRecord(
      f"{kind}-{i}", PROMPT if kind == "red_team" else "Name a fruit.", kind, "t",
      INITIAL if kind == "red_team" else "An apple.",
      (records.RevisionRound("harmful", "", revision),) if kind == "red_team" else (),
      "direct")
  recs = [rec(0, "red_team", good), rec(1, "red_team", "One-to-One-" * 40),
          rec(2, "red_team", INITIAL), rec(3, "helpful", "")]
  config = sft_config.get_config("tiny")
  config.data.revision_filter.enabled = True
  reason = p3_sft.revision_filter(config, recs, str(tmp_path))
  examples = sft.build_examples(recs, -1, None, 0, reason)
  assert [e.id for e in examples] == ["red_team-0", "helpful-3"]
  with open(os.path.join(tmp_path, "p3_sft", rf.SUMMARY_FILE)) as f:
    summary = json.load(f)
  assert summary["kept"] == 1 and summary["revisions"] == 3
  assert summary["dropped"] == {"red_team-1": "degenerate", "red_team-2": "unchanged"}
  config.data.revision_filter.enabled = False  # off: nothing dropped, nothing written
  assert p3_sft.revision_filter(config, recs, str(tmp_path / "off")) is None
  assert len(sft.build_examples(recs, -1, None, 0, None)) == 4
