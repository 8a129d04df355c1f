"""The package as users install it: a wheel built from the checkout, installed into a
fresh virtual environment outside the repository and used from another folder. It finds
the bundled constitutions and presets, and its `cai-jax` command runs the tiny preset
by name."""

import json
import os
import shutil
import site
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(environment variables, folder outside the repository) of a fresh virtual
  environment with the wheel installed and `cai-jax` on its PATH. The venv borrows the
  test environment's packages (jax, ...) through a .pth file, so nothing is downloaded;
  the test environment's own cai_jax (an editable install) is not on that path."""
  root = tmp_path_factory.mktemp("wheel")
  src = root / "src"  # a copy, so the build leaves nothing in the checkout
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "constitutions", "configs"):
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src)
  shutil.copytree(os.path.join(REPO, "cai_jax"), src / "cai_jax",  # not the checkout's links
                  ignore=shutil.ignore_patterns("__pycache__", "configs", "constitutions"))
  pip = ["-m", "pip", "-q", "--disable-pip-version-check"]
  subprocess.run([sys.executable, *pip, "wheel", "--no-deps", "--no-build-isolation",
                  str(src), "-w", str(root / "wheels")], check=True, capture_output=True)
  (wheel,) = (root / "wheels").glob("cai_jax-*.whl")
  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                            "['purelib'])"], check=True, capture_output=True,
                           text=True).stdout.strip()
  with open(os.path.join(purelib, "borrowed.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  subprocess.run([python, *pip, "install", "--no-deps", str(wheel)], check=True,
                 capture_output=True)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
  elsewhere = root / "elsewhere"
  elsewhere.mkdir()
  assert not str(elsewhere).startswith(REPO + os.sep)
  return env, elsewhere, str(venv)


def _run(args, installed, timeout=600):
  env, elsewhere, _ = installed
  return subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_wheel_ships_the_package_constitutions_and_presets(installed):
  probe = _run(["python", "-c",
                "import jax, cai_jax, cai_jax.configs as p, cai_jax.constitution as c;"
                " print(cai_jax.__file__); print(p.DIR); print(c.CONSTITUTIONS_DIR);"
                " print(len(c.load_constitution('harmless').critique_revision));"
                " print(' '.join(p.names()))"], installed)
  assert probe.returncode == 0, probe.stderr[-2000:]
  module_file, presets_dir, constitutions_dir, num_principles, names = probe.stdout.splitlines()
  venv = installed[2]
  for path in (module_file, presets_dir, constitutions_dir):
    assert path.startswith(venv), path  # the wheel's copy, not the repository's
  assert int(num_principles) >= 16  # the paper's 16 harmlessness principles
  assert names.split() == sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                                 if f.endswith(".py") and f not in ("__init__.py",
                                                                    "common.py"))


def test_console_command_runs_the_tiny_preset(installed, tiny_model_dir):
  help_ = _run(["cai-jax", "--help"], installed)
  assert help_.returncode == 0, help_.stderr[-2000:]
  for word in ("pipeline", "stage", "report", "p3", "critique_revision", "grpo",
               "evaluation", "smoke", "tiny_pipeline:<model dir>", "sft:cpu"):
    assert word in help_.stdout, word
  # The pipeline command with a config of the user's own (a path): the shipped tiny
  # preset's first stage.
  _, elsewhere, _ = installed
  (elsewhere / "first_stage.py").write_text(
      "import ml_collections\n"
      "from cai_jax.configs import tiny_pipeline\n\n\n"
      "def get_config(model):\n"
      "  c = tiny_pipeline.get_config(model)\n"
      "  return ml_collections.ConfigDict({'prompts': c.prompts})\n")
  first = _run(["cai-jax", "pipeline", f"--config=first_stage.py:{tiny_model_dir}",
                "--workdir=w"], installed)
  assert first.returncode == 0, first.stderr[-3000:]
  # One stage with the preset named, no path: it reads stage 1's prompts from the workdir
  # and the model from the preset.
  revise = _run(["cai-jax", "stage", "p2", f"--config=tiny_pipeline:{tiny_model_dir}",
                 "--workdir=w"], installed)
  assert revise.returncode == 0, revise.stderr[-3000:]
  report = _run(["cai-jax", "report", "--workdir=w"], installed)
  assert report.returncode == 0, report.stderr[-2000:]
  workdir = elsewhere / "w"
  for stage_dir in ("p1_prompts", "p2_critique_revision"):
    assert os.listdir(workdir / stage_dir), stage_dir
  timings = json.loads((workdir / "pipeline_timings.json").read_text())
  assert list(timings) == ["prompts"]
  assert (workdir / "report" / "report.md").stat().st_size > 0
  bad = _run(["cai-jax", "stage", "dpo", "--config=tiny", "--workdir=w"], installed)
  assert bad.returncode == 2 and "no 'dpo' section" in bad.stderr, bad.stderr[-2000:]
