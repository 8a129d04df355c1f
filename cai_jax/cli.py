"""The `cai-jax` console command: the pipeline, one stage, or the report.

  cai-jax pipeline --config=cpu --workdir=runs/cai
  cai-jax stage sft --config=cpu --workdir=runs/cai
  cai-jax report --workdir=runs/cai

`pipeline` and `stage` are `python -m cai_jax.pipeline` and `python -m
cai_jax.phases.<stage>` under one name, with the same flags (cai_jax.phases.cli);
`report` is `python -m cai_jax.evaluation.report`.
"""

from __future__ import annotations

import os
import sys
import textwrap

from cai_jax import configs

USAGE = """\
usage: cai-jax <command> [flags]

commands:
  pipeline --config=<preset> --workdir=<dir>
      every stage of the config in order; rerunning resumes where it stopped
  stage <stage> --config=<preset> --workdir=<dir>
      one stage, reading the stages before it from the workdir
  report --workdir=<dir>
      rewrite <dir>/report/report.md from the run's files

stages:
{stages}

presets (--config=...):
  tiny, cpu, smoke, full          pipeline variants; +dpo, +rloo, +grpo add stage 7's
                                  alternatives (cpu+grpo+dpo); +gated two PMs by
                                  prompt kind and the gated reward (cpu+gated);
                                  +decide held-out sets large enough to decide;
                                  +edgy safe-but-edgy training prompts
  <config>:<variant>              a shipped config file and its variant (tiny, cpu,
                                  full), e.g. sft:cpu; the files:
{names}
  tiny_pipeline:<model dir>       the whole pipeline on one tiny model directory
  path/to/config.py[:variant]     a config of your own
  A stage given a pipeline preset runs its section of it. Override any field with
  --config.<field>=<value> (--config.sft.optim.lr=1e-4 in a pipeline preset).

`cai-jax <command> --helpfull` lists every flag of a command.
"""


def stages() -> dict[str, tuple[str, object]]:
  """Stage name or alias (p1 ... p8) -> (stage name, its module), in pipeline order."""
  from cai_jax import pipeline
  table = {name: (name, module) for name, module in pipeline.STAGES}
  for name, module in pipeline.STAGES:  # p7_ppo and p7_dpo: p7 is PPO, the paper's
    table.setdefault(module.__name__.rsplit(".", 1)[-1].split("_")[0], (name, module))
  return table


def usage() -> str:
  """The --help text: commands, the stages and their modules, the presets."""
  table = stages()
  alias = {name: key for key, (name, _) in table.items() if key != name}
  lines = [f"  {alias.get(name, ''):3s} {name:18s} {module.__name__}"
           for key, (name, module) in table.items() if key == name]
  names = textwrap.fill(", ".join(configs.names()), 88, initial_indent=" " * 34,
                        subsequent_indent=" " * 34)
  return USAGE.format(stages="\n".join(lines), names=names)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  command, rest = (argv[0], argv[1:]) if argv else ("", [])
  if command in ("-h", "--help", "help"):
    try:
      print(usage(), flush=True)
    except BrokenPipeError:  # `cai-jax --help | head`: the reader left; no traceback
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  elif command == "pipeline":
    from cai_jax import pipeline
    from cai_jax.phases import cli
    sys.argv = ["cai-jax pipeline", *rest]
    cli.main(pipeline.run)
  elif command == "stage":
    table = stages()
    if not rest or rest[0] not in table:
      _fail(f"stage: name one of {', '.join(k for k, (n, _) in table.items() if k == n)} (or p1 ... p8)"
            " first, e.g. cai-jax stage sft --config=cpu --workdir=runs/cai")
    name, module = table[rest[0]]
    from cai_jax.phases import cli
    sys.argv = [f"cai-jax stage {name}", *rest[1:]]
    cli.main(module.run, stage=name)
  elif command == "report":
    from cai_jax.evaluation import report
    sys.argv = ["cai-jax report", *rest]
    report.main()
  else:
    _fail(f"unknown command {command!r}; use pipeline, stage or report (cai-jax --help)"
          if command else "name a command: pipeline, stage or report (cai-jax --help)")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  main()
