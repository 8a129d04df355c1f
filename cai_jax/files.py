"""Reading the files a user hands the pipeline, with one-line errors.

Every input file (prompts, constitutions, stage outputs, label files, human
comparison files) is read through these functions, so a bad file always fails
the same way: an `InputFileError` (a ValueError, which the binaries print as
one `error:` line with exit status 2) naming the file, the line where that
makes sense, what is wrong and how to fix it. Nothing here is specific to a
stage: callers check their own fields with `require`. It imports nothing from
`cai_jax`, so the records, the constitution and the data readers all build on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any


class InputFileError(ValueError):
  """A file the user gave cannot be used; the message names it and the fix."""


# JSON's names for the Python types `json.loads` returns.
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number",
               float: "number", bool: "boolean", type(None): "null"}


def json_type(value: Any) -> str:
  return _JSON_TYPES.get(type(value), type(value).__name__)


def read_bytes(path: str, what: str = "file") -> bytes:
  """The file's bytes; missing, directory or unreadable -> one line."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise InputFileError(f"{path}: no such {what}; check the path") from None
  except IsADirectoryError:
    raise InputFileError(f"{path}: is a directory, not a {what}; give the file's path"
                         ) from None
  except PermissionError:
    raise InputFileError(f"{path}: not readable (permission denied); fix its permissions"
                         f" (chmod +r)") from None
  except OSError as e:
    raise InputFileError(f"{path}: cannot be read ({e.strerror}); check the file") from None


def decode(data: bytes, path: str) -> str:
  """UTF-8 text (a BOM is dropped); a bad byte names its line and column."""
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise InputFileError(
        f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column});"
        f" re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def read_text(path: str, what: str = "file", allow_empty: bool = False) -> str:
  """The file as UTF-8 text; an empty (or all-blank) file is an error unless allowed."""
  text = decode(read_bytes(path, what), path)
  if not allow_empty and not text.strip():
    raise InputFileError(f"{path}: the {what} is empty; it needs at least one entry")
  return text


def iter_jsonl(path: str, what: str = "JSONL file", example: str = '{"prompt": "..."}',
               allow_empty: bool = False) -> Iterator[tuple[int, dict]]:
  """(line number, object) of each non-blank line of a JSON-lines file."""
  text = read_text(path, what, allow_empty)
  for line_no, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputFileError(
          f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); each line must"
          f" be one JSON object, e.g. {example}") from None
    if not isinstance(row, dict):
      raise InputFileError(
          f"{path}:{line_no}: a JSON {json_type(row)} where a JSON object is expected;"
          f" each line must be one object, e.g. {example}")
    yield line_no, row


def read_jsonl(path: str, what: str = "JSONL file", example: str = '{"prompt": "..."}',
               allow_empty: bool = False) -> list[tuple[int, dict]]:
  return list(iter_jsonl(path, what, example, allow_empty))


def require(row: Mapping[str, Any], fields: Mapping[str, type | tuple[type, ...]],
            where: str, fix: str = "") -> None:
  """Each of `fields` is present in `row` with one of its types (JSON numbers: int or
  float, never bool). `where`: "path:line" of the row; `fix`: appended to the error."""
  tail = f"; {fix}" if fix else ""
  for name, types in fields.items():
    if name not in row:
      raise InputFileError(f"{where}: no field {name!r} (the object's fields are"
                           f" {sorted(row)}){tail}")
    types = types if isinstance(types, tuple) else (types,)
    value = row[name]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
      ok = True
    if not ok:
      want = " or ".join(sorted({_JSON_TYPES.get(t, t.__name__) for t in types}))
      raise InputFileError(f"{where}: field {name!r} is a JSON {json_type(value)}"
                           f" ({value!r:.60}), expected a {want}{tail}")


def check_readable(path: str, what: str = "file") -> None:
  """Fails the way `read_bytes` does, without reading more than a byte."""
  if not os.path.exists(path):
    raise InputFileError(f"{path}: no such {what}; check the path")
  if os.path.isdir(path):
    raise InputFileError(f"{path}: is a directory, not a {what}; give the file's path")
  if not os.access(path, os.R_OK):
    raise InputFileError(f"{path}: not readable (permission denied); fix its permissions"
                         f" (chmod +r)")
