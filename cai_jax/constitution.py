"""Constitutions: the written principles that are the only human oversight in CAI.

A constitution is a YAML file (schema in `constitutions/README.md`) holding
critique/revision principle pairs for phase 1 (SL-CAI), multiple-choice
comparison principles for phase 2 (RLAIF feedback), and few-shot examples for
both. It is loaded into frozen dataclasses and validated strictly: a typo in a
key or a missing revision request would silently change what the model is
trained towards, so every problem raises a `ConstitutionError` that names the
file, the principle and the field, and says how to fix it.

Principle draws are a pure function of (seed, prompt id, round), not of batch
order or host count, so a resumed or re-sharded run draws the same principles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import yaml

from cai_jax import files

Answer = Literal["Yes", "No"]
Choice = Literal["A", "B"]



def _shipped_dir() -> str:
  """Where the shipped constitutions live: `cai_jax/constitutions/` in an installed
  wheel (pyproject maps the top-level `constitutions/` there), the repository's
  top-level `constitutions/` in a checkout or an editable install."""
  here = os.path.dirname(os.path.abspath(__file__))
  for candidate in (os.path.join(here, "constitutions"),
                    os.path.join(os.path.dirname(here), "constitutions")):
    if os.path.isdir(candidate):
      return candidate
  return os.path.join(os.path.dirname(here), "constitutions")


CONSTITUTIONS_DIR = _shipped_dir()


class ConstitutionError(ValueError):
  """A constitution file that cannot be used; the message says where and how to fix it."""


@dataclasses.dataclass(frozen=True)
class CritiqueRevisionPrinciple:
  """One phase-1 principle: a critique request and the matching revision request."""

  id: str
  critique: str
  revision: str


@dataclasses.dataclass(frozen=True)
class PointwiseQuestion:
  """A Yes/No question scoring one response alone.

  Small feedback models are near chance on A/B questions but usable on
  Yes/No ones, so each comparison principle may carry one. `good_answer` is
  the answer a good response earns ("No" for "Is it harmful?").
  """

  question: str
  good_answer: Answer

  @property
  def bad_answer(self) -> Answer:
    return "Yes" if self.good_answer == "No" else "No"


@dataclasses.dataclass(frozen=True)
class ComparisonPrinciple:
  """One phase-2 principle, phrased as a multiple-choice question over (A) and (B)."""

  id: str
  question: str
  pointwise: PointwiseQuestion | None = None


@dataclasses.dataclass(frozen=True)
class CritiqueRevisionExample:
  """A worked phase-1 example: prompt, poor first response, critique, revision."""

  principle_id: str
  prompt: str
  response: str
  critique: str
  revision: str


@dataclasses.dataclass(frozen=True)
class ComparisonExample:
  """A worked phase-2 multiple-choice example; `reasoning` serves chain-of-thought prompts."""

  principle_id: str
  prompt: str
  response_a: str
  response_b: str
  answer: Choice
  reasoning: str | None = None


@dataclasses.dataclass(frozen=True)
class Constitution:
  """A whole constitution, as loaded from one file."""

  name: str
  version: str
  description: str
  critique_revision: tuple[CritiqueRevisionPrinciple, ...]
  comparison: tuple[ComparisonPrinciple, ...]
  few_shot: tuple[CritiqueRevisionExample, ...] = ()
  comparison_few_shot: tuple[ComparisonExample, ...] = ()
  source: str = "<memory>"

  def critique_principle(self, principle_id: str) -> CritiqueRevisionPrinciple:
    """The critique/revision principle with this id (KeyError if none)."""
    for p in self.critique_revision:
      if p.id == principle_id:
        return p
    raise KeyError(f"{self.source}: no critique_revision principle with id {principle_id!r}")

  def comparison_principle(self, principle_id: str) -> ComparisonPrinciple:
    """The comparison principle with this id (KeyError if none)."""
    for p in self.comparison:
      if p.id == principle_id:
        return p
    raise KeyError(f"{self.source}: no comparison principle with id {principle_id!r}")


# --- loading and validation ------------------------------------------------------

# Field name -> (required, expected Python types, what to write). The help text
# goes into error messages, so it says what the field is for.
_Fields = Mapping[str, tuple[bool, tuple[type, ...], str]]

_TOP_FIELDS: _Fields = {
    "name": (True, (str,), "a short name for the constitution"),
    "version": (True, (str, int), "a version string such as \"1.0\" (quote it)"),
    "description": (True, (str,), "one or two sentences on what it is for"),
    "critique_revision": (True, (list,), "a non-empty list of {id, critique, revision}"),
    "comparison": (True, (list,), "a non-empty list of {id, question[, pointwise]}"),
    "few_shot": (False, (list,), "a list of {principle_id, prompt, response, critique, revision}"),
    "comparison_few_shot": (False, (list,),
                            "a list of {principle_id, prompt, response_a, response_b, answer}"),
}
_CRITIQUE_FIELDS: _Fields = {
    "id": (True, (str,), "a unique identifier such as \"privacy\""),
    "critique": (True, (str,), "the critique request put to the model"),
    "revision": (True, (str,), "the revision request matching the critique"),
}
_COMPARISON_FIELDS: _Fields = {
    "id": (True, (str,), "a unique identifier such as \"less_harmful\""),
    "question": (True, (str,),
                 "a multiple-choice question such as \"Which response is less harmful?\""),
    "pointwise": (False, (dict,), "a mapping {question, good_answer}"),
}
_POINTWISE_FIELDS: _Fields = {
    "question": (True, (str,), "a Yes/No question about a single response"),
    "good_answer": (True, (str,), "\"Yes\" or \"No\" in quotes: the answer a good response earns"),
}
_FEW_SHOT_FIELDS: _Fields = {
    "principle_id": (True, (str,), "the id of a critique_revision principle"),
    "prompt": (True, (str,), "the human's request"),
    "response": (True, (str,), "the assistant's first, poor response"),
    "critique": (True, (str,), "the critique of that response"),
    "revision": (True, (str,), "the revised response"),
}
_COMPARISON_FEW_SHOT_FIELDS: _Fields = {
    "principle_id": (True, (str,), "the id of a comparison principle"),
    "prompt": (True, (str,), "the human's request"),
    "response_a": (True, (str,), "option (A)"),
    "response_b": (True, (str,), "option (B)"),
    "answer": (True, (str,), "\"A\" or \"B\""),
    "reasoning": (False, (str,), "optional step-by-step reasoning for chain-of-thought prompts"),
}


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _check_fields(data: Any, fields: _Fields, where: str, source: str) -> dict[str, Any]:
  """Checks one mapping against its schema; returns it with strings stripped."""
  if not isinstance(data, dict):
    raise ConstitutionError(
        f"{source}: {where} must be a mapping of fields ({', '.join(fields)}), "
        f"got {_type_name(data)}. Write it as `key: value` lines.")
  unknown = sorted(str(k) for k in data if k not in fields)
  if unknown:
    raise ConstitutionError(
        f"{source}: {where}: unknown field(s) {', '.join(repr(k) for k in unknown)}. "
        f"Allowed fields are {', '.join(fields)}; fix the spelling or remove them.")
  out: dict[str, Any] = {}
  for key, (required, types, help_text) in fields.items():
    if key not in data:
      if required:
        raise ConstitutionError(
            f"{source}: {where}: field {key!r} is missing. Add `{key}:` with {help_text}.")
      continue
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, types):
      hint = ""
      if isinstance(value, bool):
        hint = " YAML reads unquoted yes/no/true/false/on/off as booleans; put the value in quotes."
      elif isinstance(value, float):
        hint = " YAML read a number; put the value in quotes."
      raise ConstitutionError(
          f"{source}: {where}: field {key!r} has type {_type_name(value)}, expected "
          f"{' or '.join(t.__name__ for t in types)} ({help_text}).{hint}")
    if isinstance(value, str):
      value = value.strip()
      if not value:
        raise ConstitutionError(
            f"{source}: {where}: field {key!r} is an empty string. Give it {help_text}.")
    if isinstance(value, list) and required and not value:
      raise ConstitutionError(
          f"{source}: {where}: field {key!r} is an empty list. Give it {help_text}.")
    out[key] = value
  return out


def _label(section: str, i: int, item: Any) -> str:
  """Principle label for messages: `section[i]`, plus the id when it has a usable one."""
  pid = item.get("id") if isinstance(item, dict) else None
  if isinstance(pid, str) and pid.strip():
    return f"{section}[{i}] (id {pid!r})"
  return f"{section}[{i}]"


def _check_unique_ids(items: Sequence[dict[str, Any]], section: str, source: str) -> None:
  seen: dict[str, int] = {}
  for i, item in enumerate(items):
    pid = item["id"]
    if pid in seen:
      raise ConstitutionError(
          f"{source}: {section}[{i}]: field 'id' duplicates id {pid!r} of {section}[{seen[pid]}]. "
          f"Ids must be unique within {section}; rename one of them.")
    seen[pid] = i


def parse_constitution(data: Any, source: str = "<memory>") -> Constitution:
  """Validates already-parsed YAML data and builds a `Constitution`."""
  top = _check_fields(data, _TOP_FIELDS, "top level", source)

  critiques = []
  for i, item in enumerate(top["critique_revision"]):
    f = _check_fields(item, _CRITIQUE_FIELDS, _label("critique_revision", i, item), source)
    critiques.append(f)
  _check_unique_ids(critiques, "critique_revision", source)

  comparisons = []
  for i, item in enumerate(top["comparison"]):
    where = _label("comparison", i, item)
    f = _check_fields(item, _COMPARISON_FIELDS, where, source)
    if "pointwise" in f:
      pw = _check_fields(f["pointwise"], _POINTWISE_FIELDS, f"{where}.pointwise", source)
      if pw["good_answer"] not in ("Yes", "No"):
        raise ConstitutionError(
            f"{source}: {where}.pointwise: field 'good_answer' is {pw['good_answer']!r}; "
            f"it must be \"Yes\" or \"No\" (quoted, capitalised).")
      f["pointwise"] = PointwiseQuestion(**pw)
    comparisons.append(f)
  _check_unique_ids(comparisons, "comparison", source)

  critique_ids = {c["id"] for c in critiques}
  comparison_ids = {c["id"] for c in comparisons}

  few_shot = []
  for i, item in enumerate(top.get("few_shot", [])):
    where = f"few_shot[{i}]"
    f = _check_fields(item, _FEW_SHOT_FIELDS, where, source)
    if f["principle_id"] not in critique_ids:
      raise ConstitutionError(
          f"{source}: {where}: field 'principle_id' is {f['principle_id']!r}, which is not the id "
          f"of any critique_revision principle. Use one of: {', '.join(sorted(critique_ids))}.")
    few_shot.append(CritiqueRevisionExample(**f))

  comparison_few_shot = []
  for i, item in enumerate(top.get("comparison_few_shot", [])):
    where = f"comparison_few_shot[{i}]"
    f = _check_fields(item, _COMPARISON_FEW_SHOT_FIELDS, where, source)
    if f["principle_id"] not in comparison_ids:
      raise ConstitutionError(
          f"{source}: {where}: field 'principle_id' is {f['principle_id']!r}, which is not the id "
          f"of any comparison principle. Use one of: {', '.join(sorted(comparison_ids))}.")
    if f["answer"] not in ("A", "B"):
      raise ConstitutionError(
          f"{source}: {where}: field 'answer' is {f['answer']!r}; it must be \"A\" or \"B\".")
    comparison_few_shot.append(ComparisonExample(**f))

  return Constitution(
      name=top["name"],
      version=str(top["version"]),
      description=top["description"],
      critique_revision=tuple(CritiqueRevisionPrinciple(**c) for c in critiques),
      comparison=tuple(ComparisonPrinciple(**c) for c in comparisons),
      few_shot=tuple(few_shot),
      comparison_few_shot=tuple(comparison_few_shot),
      source=source,
  )


def _check_duplicate_keys(node: yaml.Node, source: str) -> None:
  """Rejects repeated mapping keys, which `yaml.safe_load` would silently merge."""
  if isinstance(node, yaml.MappingNode):
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
      if isinstance(key_node, yaml.ScalarNode):
        line = key_node.start_mark.line + 1
        if key_node.value in seen:
          raise ConstitutionError(
              f"{source}: line {line}: field {key_node.value!r} appears twice in the same "
              f"mapping (first at line {seen[key_node.value]}). Remove or rename one.")
        seen[key_node.value] = line
      _check_duplicate_keys(value_node, source)
  elif isinstance(node, yaml.SequenceNode):
    for child in node.value:
      _check_duplicate_keys(child, source)


# The one helpfulness principle that labels (stage 5) and judges (stage 8) pairs of
# helpful prompts, and its default wording.
HELPFUL_PRINCIPLE = "more_helpful"
HELPFUL_QUESTION = ("Which of these assistant responses is more helpful: it answers the"
                    " user's request correctly, clearly and completely?")
HELPFUL_POINTWISE = ("Does the assistant's response answer the user's request helpfully"
                     " and correctly?")


def helpfulness_constitution(base: Constitution, question: str = HELPFUL_QUESTION,
                             pointwise: str = HELPFUL_POINTWISE) -> Constitution:
  """`base` with one comparison principle, HELPFUL_PRINCIPLE (good answer "Yes"), and
  no few-shot examples."""
  principle = ComparisonPrinciple(HELPFUL_PRINCIPLE, question,
                                  PointwiseQuestion(pointwise, "Yes"))
  return dataclasses.replace(base, comparison=(principle,), comparison_few_shot=())


def constitution_path(name_or_path: str | os.PathLike[str]) -> str:
  """Resolves a file path, or a shipped constitution name such as "harmless"."""
  path = os.fspath(name_or_path)
  if os.path.exists(path):
    return path
  if os.sep not in path and not path.endswith((".yaml", ".yml")):
    shipped = os.path.join(CONSTITUTIONS_DIR, f"{path}.yaml")
    if os.path.exists(shipped):
      return shipped
  raise ConstitutionError(
      f"{path}: no such constitution file. Give a path to a YAML file or one of the shipped "
      f"names: {', '.join(list_constitutions()) or '(none found)'}.")


def list_constitutions() -> list[str]:
  """Names of the constitutions shipped in `constitutions/`."""
  if not os.path.isdir(CONSTITUTIONS_DIR):
    return []
  return sorted(f[:-5] for f in os.listdir(CONSTITUTIONS_DIR) if f.endswith(".yaml"))


def load_constitution(name_or_path: str | os.PathLike[str]) -> Constitution:
  """Reads and validates a constitution file (or a shipped one by name)."""
  path = constitution_path(name_or_path)
  text = files.read_text(path, "constitution", allow_empty=True)
  try:
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None:
      _check_duplicate_keys(node, path)
    data = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise ConstitutionError(
        f"{path}: not valid YAML: {e}. Fix the syntax at the position shown.") from e
  if data is None:
    raise ConstitutionError(
        f"{path}: the file is empty. See constitutions/README.md for the schema.")
  return parse_constitution(data, source=path)


# --- seeded principle draws ------------------------------------------------------

def _rng(tag: str, seed: int, item_id: str, index: int) -> np.random.Generator:
  """A generator keyed by content, not by position: same key, same draw, in any batch order."""
  key = json.dumps([tag, int(seed), str(item_id), int(index)]).encode()
  digest = hashlib.sha256(key).digest()
  return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def draw_principles(constitution: Constitution, seed: int, prompt_id: str,
                    num_rounds: int) -> list[str]:
  """Critique/revision principle ids for each revision round of one prompt.

  Each round is drawn independently and with replacement (as in the paper),
  keyed by (seed, prompt_id, round): the draw for round r does not depend on
  `num_rounds`, on other prompts, or on batch order.
  """
  if num_rounds < 0:
    raise ValueError(f"num_rounds must be >= 0, got {num_rounds}")
  n = len(constitution.critique_revision)
  return [constitution.critique_revision[int(_rng("critique", seed, prompt_id, r).integers(n))].id
          for r in range(num_rounds)]


def draw_comparison_principles(constitution: Constitution, seed: int, pair_id: str, k: int,
                               replace: bool = False) -> list[str]:
  """Comparison principle ids to ensemble the feedback label of one response pair.

  Without replacement by default, since averaging over distinct principles is
  what makes the ensemble useful; keyed by (seed, pair_id) like `draw_principles`.
  """
  n = len(constitution.comparison)
  if k < 0 or (not replace and k > n):
    raise ValueError(f"k must be in [0, {n}] without replacement (the constitution has {n} "
                     f"comparison principles), got {k}")
  idx = _rng("comparison", seed, pair_id, 0).choice(n, size=k, replace=replace)
  return [constitution.comparison[int(i)].id for i in idx]
