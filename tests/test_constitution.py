"""Constitutions: the shipped files, strict validation, and seeded principle draws."""

from __future__ import annotations

import collections
import copy
import random
from typing import Any

import pytest
import yaml

from cai_jax import constitution as C

DEPLOYMENTS = ("medical_assistant", "customer_service", "creative_writing")


# --- shipped constitutions -------------------------------------------------------

def test_shipped_constitutions_are_listed():
  assert set(C.list_constitutions()) >= {"harmless", *DEPLOYMENTS}


def test_harmless_counts():
  c = C.load_constitution("harmless")
  assert len(c.critique_revision) == 16
  assert len(c.comparison) == 16
  assert len(c.few_shot) >= 3
  assert len(c.comparison_few_shot) >= 2
  assert {e.answer for e in c.comparison_few_shot} == {"A", "B"}  # not all one letter


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_counts(name: str):
  c = C.load_constitution(name)
  assert c.name == name
  assert len(c.critique_revision) >= 6
  assert len(c.comparison) >= 6
  assert len(c.few_shot) >= 2
  assert len(c.comparison_few_shot) >= 2


@pytest.mark.parametrize("name", ("harmless", *DEPLOYMENTS))
def test_shipped_constitution_is_well_formed(name: str):
  c = C.load_constitution(name)
  assert c.source.endswith(f"{name}.yaml")
  for p in c.critique_revision:
    assert c.critique_principle(p.id) is p
  for p in c.comparison:
    assert c.comparison_principle(p.id) is p
    assert "which" in p.question.lower(), p.id  # phrased as a multiple-choice question
    if p.pointwise is not None:
      assert p.pointwise.good_answer in ("Yes", "No")
      assert p.pointwise.bad_answer != p.pointwise.good_answer
  for e in c.few_shot:
    c.critique_principle(e.principle_id)
  for e in c.comparison_few_shot:
    c.comparison_principle(e.principle_id)


def test_dataclasses_are_frozen():
  c = C.load_constitution("harmless")
  with pytest.raises(Exception):
    c.name = "x"  # type: ignore[misc]
  with pytest.raises(Exception):
    c.critique_revision[0].critique = "x"  # type: ignore[misc]


def test_lookup_of_unknown_id_raises():
  c = C.load_constitution("harmless")
  with pytest.raises(KeyError, match="nope"):
    c.critique_principle("nope")


def test_unknown_name_lists_shipped_ones():
  with pytest.raises(C.ConstitutionError, match="harmless"):
    C.load_constitution("no_such_constitution")


# --- validation ------------------------------------------------------------------

def _good() -> dict[str, Any]:
  return {
      "name": "t",
      "version": "1",
      "description": "a test constitution",
      "critique_revision": [
          {"id": "a", "critique": "Critique A.", "revision": "Revise A."},
          {"id": "b", "critique": "Critique B.", "revision": "Revise B."},
      ],
      "comparison": [
          {"id": "x", "question": "Which is better?",
           "pointwise": {"question": "Is it bad?", "good_answer": "No"}},
          {"id": "y", "question": "Which is kinder?"},
      ],
      "few_shot": [
          {"principle_id": "a", "prompt": "p", "response": "r", "critique": "c", "revision": "v"},
      ],
      "comparison_few_shot": [
          {"principle_id": "x", "prompt": "p", "response_a": "1", "response_b": "2", "answer": "A"},
      ],
  }


def _write(tmp_path, data: Any) -> str:
  path = tmp_path / "bad.yaml"
  path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
  return str(path)


def test_good_file_loads(tmp_path):
  c = C.load_constitution(_write(tmp_path, _good()))
  assert c.version == "1"
  assert c.comparison[0].pointwise == C.PointwiseQuestion("Is it bad?", "No")
  assert c.comparison[1].pointwise is None


def test_integer_version_and_optional_sections(tmp_path):
  d = _good()
  d["version"] = 3
  del d["few_shot"], d["comparison_few_shot"]
  c = C.load_constitution(_write(tmp_path, d))
  assert c.version == "3" and c.few_shot == () and c.comparison_few_shot == ()


def _set(path: list[Any], value: Any):
  def edit(d):
    for k in path[:-1]:
      d = d[k]
    d[path[-1]] = value
  return edit


def _delete(path: list[Any]):
  def edit(d):
    for k in path[:-1]:
      d = d[k]
    del d[path[-1]]
  return edit


# (edit to the good constitution, fragments the message must contain)
BAD_CASES = {
    "missing_revision": (_delete(["critique_revision", 1, "revision"]),
                         ["critique_revision[1]", "'b'", "'revision'", "missing", "Add"]),
    "empty_critique": (_set(["critique_revision", 0, "critique"], "   "),
                       ["critique_revision[0]", "'a'", "'critique'", "empty"]),
    "duplicate_id": (_set(["critique_revision", 1, "id"], "a"),
                     ["critique_revision[1]", "'id'", "duplicates", "rename"]),
    "wrong_type": (_set(["critique_revision", 1, "critique"], 42),
                   ["critique_revision[1]", "'b'", "'critique'", "int", "expected str"]),
    "unknown_key": (_set(["critique_revision", 0, "critque"], "typo"),
                    ["critique_revision[0]", "'a'", "'critque'", "unknown", "Allowed"]),
    "missing_id": (_delete(["critique_revision", 1, "id"]),
                   ["critique_revision[1]", "'id'", "missing"]),
    "principle_not_mapping": (_set(["critique_revision", 1], "just a string"),
                              ["critique_revision[1]", "mapping", "str"]),
    "empty_list": (_set(["critique_revision"], []),
                   ["top level", "'critique_revision'", "empty list"]),
    "comparison_missing_question": (_delete(["comparison", 1, "question"]),
                                    ["comparison[1]", "'y'", "'question'", "missing"]),
    "comparison_duplicate_id": (_set(["comparison", 1, "id"], "x"),
                                ["comparison[1]", "'id'", "duplicates"]),
    "pointwise_bad_answer": (_set(["comparison", 0, "pointwise", "good_answer"], "maybe"),
                             ["comparison[0]", "'x'", "pointwise", "'good_answer'", "Yes"]),
    "pointwise_unknown_key": (_set(["comparison", 0, "pointwise", "good"], "No"),
                              ["comparison[0]", "'x'", "pointwise", "'good'", "unknown"]),
    "pointwise_missing_question": (_delete(["comparison", 0, "pointwise", "question"]),
                                   ["comparison[0]", "'x'", "pointwise", "'question'", "missing"]),
    "few_shot_unknown_principle": (_set(["few_shot", 0, "principle_id"], "zzz"),
                                   ["few_shot[0]", "'principle_id'", "'zzz'", "a, b"]),
    "few_shot_missing_revision": (_delete(["few_shot", 0, "revision"]),
                                  ["few_shot[0]", "'revision'", "missing"]),
    "comparison_few_shot_bad_answer": (_set(["comparison_few_shot", 0, "answer"], "C"),
                                       ["comparison_few_shot[0]", "'answer'", "\"A\" or \"B\""]),
    "comparison_few_shot_critique_id": (_set(["comparison_few_shot", 0, "principle_id"], "a"),
                                        ["comparison_few_shot[0]", "'principle_id'", "x, y"]),
    "missing_name": (_delete(["name"]), ["top level", "'name'", "missing"]),
    "unknown_top_key": (_set(["comparisons"], []), ["top level", "'comparisons'", "unknown"]),
    "float_version": (_set(["version"], 1.5), ["top level", "'version'", "float", "quotes"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_principle_and_field(tmp_path, case: str):
  edit, fragments = BAD_CASES[case]
  data = copy.deepcopy(_good())
  edit(data)
  path = _write(tmp_path, data)
  with pytest.raises(C.ConstitutionError) as info:
    C.load_constitution(path)
  msg = str(info.value)
  assert isinstance(info.value, ValueError)
  assert path in msg, msg
  for fragment in fragments:
    assert fragment in msg, (fragment, msg)


def test_unquoted_yaml_boolean_gets_a_hint(tmp_path):
  text = yaml.safe_dump(_good(), sort_keys=False).replace("good_answer: 'No'", "good_answer: No")
  assert "good_answer: No\n" in text
  path = _write(tmp_path, text)
  with pytest.raises(C.ConstitutionError) as info:
    C.load_constitution(path)
  msg = str(info.value)
  for fragment in (path, "comparison[0]", "'x'", "'good_answer'", "bool", "quotes"):
    assert fragment in msg, (fragment, msg)


def test_repeated_key_is_an_error(tmp_path):
  text = yaml.safe_dump(_good(), sort_keys=False).replace(
      "critique: Critique B.\n", "critique: Critique B.\n  critique: Again.\n")
  path = _write(tmp_path, text)
  with pytest.raises(C.ConstitutionError) as info:
    C.load_constitution(path)
  msg = str(info.value)
  for fragment in (path, "'critique'", "appears twice", "line"):
    assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize("text,fragment", [
    ("name: [unclosed\n", "not valid YAML"),
    ("", "empty"),
    ("- just\n- a list\n", "top level"),
])
def test_unusable_files(tmp_path, text: str, fragment: str):
  path = _write(tmp_path, text)
  with pytest.raises(C.ConstitutionError) as info:
    C.load_constitution(path)
  assert path in str(info.value) and fragment in str(info.value)


def test_strings_are_stripped(tmp_path):
  d = _good()
  d["critique_revision"][0]["critique"] = "  Critique A.\n"
  c = C.load_constitution(_write(tmp_path, d))
  assert c.critique_revision[0].critique == "Critique A."


# --- draws -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def harmless() -> C.Constitution:
  return C.load_constitution("harmless")


def test_draws_are_reproducible(harmless):
  a = C.draw_principles(harmless, 1234, "prompt-7", 4)
  b = C.draw_principles(harmless, 1234, "prompt-7", 4)
  assert a == b and len(a) == 4
  ids = {p.id for p in harmless.critique_revision}
  assert set(a) <= ids


def test_draws_pinned():
  """Pins the draw to its definition (sha256 key -> numpy PCG64), so a change is noticed."""
  c = C.parse_constitution(_good())
  got = [C.draw_principles(c, 0, f"p{i}", 3) for i in range(4)]
  again = [C.draw_principles(c, 0, f"p{i}", 3) for i in range(4)]
  assert got == again
  assert got == PINNED_DRAWS, got


PINNED_DRAWS = [["b", "a", "b"], ["a", "b", "a"], ["a", "a", "b"], ["a", "b", "b"]]


def test_draws_vary_over_rounds_prompts_and_seeds(harmless):
  prompts = [f"prompt-{i}" for i in range(300)]
  draws = {p: C.draw_principles(harmless, 0, p, 4) for p in prompts}
  # Rounds differ: with 16 principles, nearly every prompt sees >1 distinct one.
  assert sum(len(set(d)) > 1 for d in draws.values()) > 280
  # Prompts differ, and every principle gets used, roughly uniformly.
  assert len({tuple(d) for d in draws.values()}) > 290
  counts = collections.Counter(x for d in draws.values() for x in d)
  assert set(counts) == {p.id for p in harmless.critique_revision}
  assert min(counts.values()) > 1200 / 16 / 2 and max(counts.values()) < 1200 / 16 * 2
  # Seeds differ.
  other = {p: C.draw_principles(harmless, 1, p, 4) for p in prompts}
  assert sum(draws[p] != other[p] for p in prompts) > 280


def test_draws_independent_of_order_and_num_rounds(harmless):
  prompts = [f"q{i}" for i in range(50)]
  forward = {p: C.draw_principles(harmless, 5, p, 4) for p in prompts}
  shuffled = prompts[:]
  random.Random(0).shuffle(shuffled)
  backward = {p: C.draw_principles(harmless, 5, p, 4) for p in shuffled}
  assert forward == backward
  for p in prompts:
    assert C.draw_principles(harmless, 5, p, 2) == forward[p][:2]
  assert C.draw_principles(harmless, 5, "q0", 0) == []
  with pytest.raises(ValueError):
    C.draw_principles(harmless, 5, "q0", -1)


def test_comparison_draws(harmless):
  a = C.draw_comparison_principles(harmless, 3, "pair-1", 4)
  assert a == C.draw_comparison_principles(harmless, 3, "pair-1", 4)
  assert len(set(a)) == 4  # distinct without replacement
  assert set(a) <= {p.id for p in harmless.comparison}
  assert C.draw_comparison_principles(harmless, 3, "pair-1", 16).__len__() == 16
  draws = [tuple(C.draw_comparison_principles(harmless, 3, f"pair-{i}", 2)) for i in range(200)]
  assert len(set(draws)) > 100
  with pytest.raises(ValueError, match="16"):
    C.draw_comparison_principles(harmless, 3, "pair-1", 17)
  assert len(C.draw_comparison_principles(harmless, 3, "pair-1", 40, replace=True)) == 40
  # Domain-separated from critique draws: not the same index stream.
  crit = [C.draw_principles(harmless, 3, f"pair-{i}", 1)[0] for i in range(50)]
  comp_idx = [C.draw_comparison_principles(harmless, 3, f"pair-{i}", 1)[0] for i in range(50)]
  crit_idx = [[p.id for p in harmless.critique_revision].index(x) for x in crit]
  comp_idx2 = [[p.id for p in harmless.comparison].index(x) for x in comp_idx]
  assert crit_idx != comp_idx2
