"""The files phases exchange: one record type per phase output, and a sharded
JSONL writer that makes every generation phase resumable.

Each phase writes `shard-NNNNN.jsonl` files into its output directory. A shard
holds the records of a fixed, contiguous chunk of the phase's inputs and
appears atomically (written to a temporary name, then renamed), so after a
kill the directory holds only complete shards and a rerun starts at the
first missing one. Generation is keyed per input id, not per batch, so the
resumed run writes exactly the records an uninterrupted run would have.
The directory is loadable with `datasets.load_dataset("json", data_files=...)`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from cai_jax import distributed, files
from cai_jax.constitution import HELPFUL_POINTWISE, HELPFUL_QUESTION

R = TypeVar("R")


# --- Record types ------------------------------------------------------------------
# Stage 1 (prompts) writes `cai_jax.data.prompts.PromptRecord`s.


@dataclasses.dataclass(frozen=True)
class RevisionRound:
  principle_id: str
  critique: str  # "" in direct-revision mode
  revision: str


@dataclasses.dataclass(frozen=True)
class CritiqueRevisionRecord:
  """Stage 2: the helpful model's first answer and every critique/revision.

  Helpfulness prompts get an initial answer and no rounds: they are the
  helpful answers that SFT mixes in.
  """

  id: str
  prompt: str
  kind: str
  source: str
  initial_response: str
  rounds: tuple[RevisionRound, ...]
  mode: str  # "critique" | "direct"

  def response_at(self, round_index: int) -> str:
    """The response after `round_index` revisions (0: the initial one, -1: last)."""
    if round_index == -1:
      return self.rounds[-1].revision if self.rounds else self.initial_response
    if round_index == 0:
      return self.initial_response
    return self.rounds[round_index - 1].revision


@dataclasses.dataclass(frozen=True)
class ResponsePair:
  """Stage 4: two samples of the SL-CAI model for one prompt; or (`revision_pairs`)
  stage 2's initial answer (a) and its last revision (b), id "<prompt id>/revision";
  or (`refusal_pairs`) a helpful prompt's first sample (a) against a canned refusal
  (b), id "<prompt id>/refusal"."""

  id: str
  prompt: str
  kind: str
  response_a: str
  response_b: str


REVISION_PAIR_SUFFIX = "/revision"
REFUSAL_PAIR_SUFFIX = "/refusal"


def red_team_records(directory: str) -> list["CritiqueRevisionRecord"]:
  """Stage 2's red-team records (helpful prompts get no revisions)."""
  return [r for r in read_records(directory, CritiqueRevisionRecord) if r.kind == "red_team"]


def revision_pair(record: "CritiqueRevisionRecord") -> ResponsePair:
  """Stage 2's initial answer (a) against its last revision (b), as a stage-4 pair."""
  return ResponsePair(id=record.id + REVISION_PAIR_SUFFIX, prompt=record.prompt,
                      kind=record.kind, response_a=record.initial_response,
                      response_b=record.response_at(-1))


def refusal_pair(pair: ResponsePair, refusal: str) -> ResponsePair:
  """A sampled pair's first answer (a) against `refusal` (b), as a stage-4 pair."""
  return ResponsePair(id=pair.id + REFUSAL_PAIR_SUFFIX, prompt=pair.prompt, kind=pair.kind,
                      response_a=pair.response_a, response_b=refusal)


PAIR_SOURCES = ("samples", "revision", "refusal")


def pair_source(pair) -> str:
  """Where stage 4 took a pair (or its label, or a PM comparison) from: "samples"
  (two SL-CAI samples), "revision" (stage 2's initial answer and revision) or
  "refusal" (a sample against a canned refusal)."""
  if pair.id.endswith(REVISION_PAIR_SUFFIX):
    return "revision"
  if pair.id.endswith(REFUSAL_PAIR_SUFFIX):
    return "refusal"
  return "samples"


@dataclasses.dataclass(frozen=True)
class LabelRecord:
  """Stage 5: the feedback model's soft preference for one `ResponsePair`.

  `p_a` is P(response_a is better), the label the preference model trains
  on. Everything it was computed from is kept, so labels can be re-derived
  (other clamps, combinations, subsets of principles or models) without
  running a model again. `logprobs[m][k][s]` holds the two answer-token
  log-probs of feedback model m, principle k, slot s: in "multiple_choice"
  mode s is the presentation order (0: a shown as (A), 1: swapped; only 0
  without order swapping) and the pair is (log P("A"), log P("B")); in "pointwise" mode s is the response
  (0: a, 1: b) and the pair is (log P(" Yes"), log P(" No")). `cot[m][k][s]`
  is the chain-of-thought reasoning (empty without chain of thought).
  JSON round trips turn the tuples into lists.
  """

  id: str
  prompt: str
  kind: str
  response_a: str
  response_b: str
  mode: str  # "multiple_choice" | "pointwise"
  models: tuple[str, ...]
  principle_ids: tuple[str, ...]
  logprobs: tuple  # [model][principle][slot][2] floats
  cot: tuple  # [model][principle][slot] str, or () without chain of thought
  model_p_a: tuple[float, ...]  # each feedback model's label
  p_a: float


def to_json(record: Any) -> str:
  return json.dumps(dataclasses.asdict(record), ensure_ascii=False)


def from_dict(cls: type[R], d: dict, where: str = "record") -> R:
  """Build a record dataclass from a dict, nested dataclasses included; a missing
  field or one of the wrong JSON type is an `InputFileError` naming `where`."""
  fields = dataclasses.fields(cls)
  files.require(d, {f.name: _json_types(f.type) for f in fields}, where,
                f"not a {cls.__name__} record; was the file written by the stage that makes"
                " these records?")
  kwargs = {}
  for f in fields:
    v = d[f.name]
    if f.name == "rounds":
      for i, r in enumerate(v):
        if not isinstance(r, dict):
          raise files.InputFileError(f"{where}: rounds[{i}] is a JSON {files.json_type(r)},"
                                     " expected an object")
      v = tuple(from_dict(RevisionRound, r, f"{where}: rounds[{i}]") for i, r in enumerate(v))
    kwargs[f.name] = v
  return cls(**kwargs)


def _json_types(annotation: str) -> tuple[type, ...]:
  """The JSON value types a record field of this (string) annotation may hold."""
  if annotation.startswith("tuple"):
    return (list,)
  return {"str": (str,), "float": (float,), "int": (int,), "bool": (bool,)}[annotation]


# Config fields added after records were first written, with the value that does what
# runs before the field did: a saved config without the field compares as that value.
ADDED_CONFIG_FIELDS = {"reviser": "", "revision_pairs": False, "refusal_pairs": False,
                       "helpful_labels": "constitution",
                       "helpful_question": HELPFUL_QUESTION,
                       "helpful_pointwise": HELPFUL_POINTWISE}
# Fields that change how fast records are made, never what they hold (the shared-prefix
# KV cache gives the same tokens, tests/test_prefix.py): a run may resume with
# another value.
SPEED_ONLY_FIELDS = frozenset({"min_shared_prefix"})


def check_same_config(directory: str, config: Any) -> None:
  """Records the config of a phase output; refuses to resume under another one.

  `config` is an `ml_collections.ConfigDict`. Multi-process safe: every
  process looks before process 0 writes.
  """
  path = os.path.join(directory, "config.json")
  current = json.loads(config.to_json())
  # The config binds the directory only once it holds records: a run that
  # failed before its first shard (bad model path, ...) may be rerun fixed.
  existed = os.path.exists(path) and bool(completed_shards(directory))
  distributed.barrier(f"{directory}/config-check")  # all look before any process writes
  if existed:
    with open(path) as f:
      previous = json.load(f)
    added = {k: v for k, v in ADDED_CONFIG_FIELDS.items() if k in current and k not in previous}
    previous = {k: v for k, v in {**added, **previous}.items() if k not in SPEED_ONLY_FIELDS}
    current = {k: v for k, v in current.items() if k not in SPEED_ONLY_FIELDS}
    if previous != current:
      changed = sorted(k for k in set(previous) | set(current)
                       if previous.get(k) != current.get(k))
      older = "".join(f"; it was made before `{k}` existed, i.e. with {k}={added[k]!r}"
                      for k in changed if k in added)
      raise ValueError(
          f"{directory}: holds records made with a different config (fields {changed}{older});"
          " rerun with the same config to resume, or delete the directory to start over")
    return
  if distributed.is_leader():
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(current, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
  distributed.barrier(f"{directory}/config")



# --- Sharded, resumable JSONL ----------------------------------------------------------


def shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"shard-{index:05d}.jsonl")


def completed_shards(directory: str) -> set[int]:
  done = set()
  for p in glob.glob(os.path.join(directory, "shard-*.jsonl")):
    name = os.path.basename(p)
    done.add(int(name[len("shard-"):-len(".jsonl")]))
  return done


def write_shard(directory: str, index: int, records: Iterable[Any]) -> None:
  """Write one shard atomically: readers see all of it or none of it.

  Its SHA-256 goes first into `shard-NNNNN.jsonl.sha256` (a seal, also atomic),
  so every shard that exists has its seal and a damaged one is found
  (`damaged_shards`) and written again.
  """
  os.makedirs(directory, exist_ok=True)
  final = shard_path(directory, index)
  data = "".join(to_json(r) + "\n" for r in records).encode("utf-8")
  for path, content in ((final + SEAL, hashlib.sha256(data).hexdigest().encode()),
                        (final, data)):
    with open(path + ".tmp", "wb") as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


SEAL = ".sha256"


def damaged_shards(directory: str) -> dict[int, str]:
  """{index: what is wrong} of the shards whose bytes do not match their seal.

  A shard without a seal (written before seals existed) is taken as it is.
  """
  out = {}
  for i in sorted(completed_shards(directory)):
    path = shard_path(directory, i)
    try:
      with open(path + SEAL, "rb") as f:
        expected = f.read().decode("ascii", "replace").strip()
    except FileNotFoundError:
      continue
    with open(path, "rb") as f:
      if hashlib.file_digest(f, "sha256").hexdigest() != expected:
        out[i] = f"{path} fails its SHA-256 check"
  return out


def drop_damaged_shards(directory: str) -> list[int]:
  """Moves damaged shards to `<directory>.damaged/` (one warning each), so the
  stage writes them again; returns their indices."""
  damaged = damaged_shards(directory)
  if damaged and distributed.is_leader():
    aside = directory.rstrip(os.sep) + ".damaged"
    os.makedirs(aside, exist_ok=True)
    for i, problem in damaged.items():
      dest = os.path.join(aside, f"{os.path.basename(shard_path(directory, i))}.{time.time_ns()}")
      logging.warning("%s; moved to %s and written again", problem, dest)
      os.replace(shard_path(directory, i), dest)
  distributed.barrier(f"{directory}/damaged-shards")
  return sorted(damaged)


def run_sharded(directory: str, inputs: Sequence[Any], shard_size: int,
                process: Callable[[Sequence[Any]], list[Any]],
                on_shard: Callable[[int, int], None] | None = None) -> int:
  """Apply `process` to each chunk of `inputs` whose shard is missing.

  Returns the number of shards computed in this call (0 when all existed).
  """
  if shard_size <= 0:
    raise ValueError(f"shard_size must be positive, got {shard_size}")
  num_shards = -(-len(inputs) // shard_size)
  drop_damaged_shards(directory)
  done = completed_shards(directory)
  computed = 0
  for i in range(num_shards):
    if i in done:
      continue
    chunk = inputs[i * shard_size:(i + 1) * shard_size]
    results = process(chunk)  # every process computes (collectives) ...
    if distributed.is_leader():  # ... one writes
      write_shard(directory, i, results)
    distributed.barrier(f"{directory}/shard-{i}")
    computed += 1
    if on_shard is not None:
      on_shard(i, num_shards)
  return computed


def read_records(directory: str, cls: type[R]) -> list[R]:
  """All records of a phase output directory, in shard order."""
  paths = sorted(glob.glob(os.path.join(directory, "shard-*.jsonl")))
  if not paths:
    raise FileNotFoundError(f"{directory}: no shard-*.jsonl files; run the phase"
                            " that writes them first")
  damaged = damaged_shards(directory)
  if damaged:
    raise ValueError(f"{next(iter(damaged.values()))}: the shard is damaged; rerun the stage"
                     " that wrote it, which writes damaged shards again")
  out = []
  for path in paths:
    for line_no, row in files.iter_jsonl(path, "shard", example="one record per line",
                                         allow_empty=True):
      out.append(from_dict(cls, row, f"{path}:{line_no}"))
  return out
