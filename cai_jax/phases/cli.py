"""The absl entry point every phase shares: --config=<config>[:variant] --workdir=<dir>.

`--config` names a file of your own (`my_config.py:variant`) or a preset shipped in
`cai_jax.configs` (the repository's configs/) without a path: `sft:cpu` (a config
file and its variant) or a bare pipeline variant (`cpu`, `tiny+dpo`: configs/
pipeline.py's). A stage given a pipeline config runs that config's section of it, so
`--config=cpu` means the same run to the pipeline and to each stage.

Flags are defined only in the process that runs a phase. Bad input (a missing file, a malformed
constitution, a mesh that does not fit, ...) raises one of the errors below
with a message that names the file or field and the fix; the binary prints
that one line and exits with status 2 instead of a traceback. Anything else
is a bug and keeps its traceback.
"""

import logging
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from cai_jax import compilation_cache, configs, distributed

# Errors that mean "the input is wrong", not "the code is wrong".
# A diverged run (FloatingPointError) is the config's fault too: its message names the
# checkpoint kept and the fix.
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError, FloatingPointError)


def error_line(e: BaseException) -> str:
  """The one line a binary prints for bad input (an `INPUT_ERRORS` instance)."""
  message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  return "error: " + " ".join(str(message).split("\n"))


def is_pipeline_config(config: ml_collections.ConfigDict) -> bool:
  """True for a pipeline config: every field is a stage's section."""
  return bool(config) and all(isinstance(v, ml_collections.ConfigDict)
                              for v in config.values())


def main(run: Callable, stage: str | None = None) -> None:
  """Runs `run(config, workdir)` from the command line. `stage`: the pipeline stage
  `run` is, which takes its own section of a pipeline config; None: `run` takes a whole
  pipeline config."""
  config = config_flags.DEFINE_config_file(
      "config", None, "A config file[:variant], a preset <name>[:variant] (e.g. sft:cpu),"
      " or a pipeline variant (tiny, cpu, smoke, full; +dpo, +rloo, +grpo).")
  workdir = flags.DEFINE_string("workdir", None, "Pipeline working directory.", required=True)
  mode = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                           "Multi-process JAX: auto-detects TPU pods and SLURM.")
  coordinator = flags.DEFINE_string("coordinator_address", None,
                                    "host:port of process 0 (explicit multi-process).")
  num_processes = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's index.")
  cache = flags.DEFINE_string(
      "compilation_cache", compilation_cache.DEFAULT,
      "JAX persistent compilation cache directory ('auto': $JAX_COMPILATION_CACHE_DIR,"
      " else <cache root>/jax; '': off).")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    value = config.value
    if value is not None and not isinstance(value, ml_collections.ConfigDict):
      try:  # config_flags stands in an object that raises the file's load error
        value.to_dict()
      except Exception as e:  # noqa: BLE001 - reported in one line
        print(f"error: --config: the config file cannot be loaded ({_last_line(e)});"
              " check its path", file=sys.stderr)
        sys.exit(2)
    if value is None:
      raise app.UsageError("--config is required, e.g. --config=cpu")
    if stage is not None and is_pipeline_config(value):
      if stage not in value:
        print(f"error: --config: that pipeline config has no {stage!r} section (it has"
              f" {', '.join(value)}); +dpo, +rloo or +grpo after its variant adds one",
              file=sys.stderr)
        sys.exit(2)
      value = value[stage]
    distributed.initialize(mode.value, coordinator.value, num_processes.value,
                           process_id.value)
    compilation_cache.enable(cache.value)
    try:
      result = run(value, workdir.value)
    except INPUT_ERRORS as e:
      logging.error("%s: %s", type(e).__name__, e)
      print(error_line(e), file=sys.stderr)
      sys.exit(2)
    if result is not None and distributed.is_leader():
      print(result)

  app.run(_main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with presets resolved to their files and config file and
  override mistakes as one-line errors."""
  argv = _resolve_presets(argv)
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
  path = os.path.abspath(spec.split(":", 1)[0]) if spec else ""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {_last_line(e)}. Pass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # noqa: BLE001 - the config file's or an override's fault
    first = _last_line(e)
    if isinstance(e, (SyntaxError, OSError, ImportError)) or _raised_in(e, path):
      where = f" line {e.lineno}" if isinstance(e, SyntaxError) and e.lineno else ""
      print(f"error: --config={spec}: the config file{where} cannot be loaded"
            f" ({type(e).__name__}: {first}); check its path, variant and Python",
            file=sys.stderr)
      sys.exit(2)
    if not isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
      raise
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: bad config override {bad}: {first} is not a field of that config or"
          " has the wrong type; see the config file for its fields", file=sys.stderr)
    sys.exit(2)


def _resolve_presets(argv: list[str]) -> list[str]:
  """argv with `--config X` written `--config=X` and the preset X names resolved."""
  out, rest = [], iter(argv)
  for a in rest:
    if a == "--config":
      a = "--config=" + next(rest, "")
    out.append("--config=" + configs.resolve(a[len("--config="):])
               if a.startswith("--config=") else a)
  return out


def _last_line(e: BaseException) -> str:
  """The line of a (possibly multi-line, traceback-quoting) error that says what is wrong."""
  text = str(e).replace("\\n", "\n").replace("\\'", "'")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  said = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", l)]
  line = said[-1] if said else "; ".join(lines) or type(e).__name__
  return line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"" else line


def _raised_in(e: BaseException, path: str) -> bool:
  """True when the exception passed through a frame of the file `path`."""
  tb = e.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == path:
      return True
    tb = tb.tb_next
  return False
