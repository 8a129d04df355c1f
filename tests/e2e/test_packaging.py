"""The package as users install it: a built wheel (not the editable checkout),
used from another directory, finds the bundled constitutions and prompts and
runs a stage."""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_wheel_install_runs_a_stage_from_another_directory(tmp_path):
  wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
  elsewhere.mkdir()
  src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "cai_jax", "constitutions"):
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src)
  pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
  subprocess.run(pip + ["wheel", "--no-deps", str(src), "-w", str(wheels)], check=True,
                 capture_output=True)
  (wheel,) = wheels.glob("cai_jax-*.whl")
  subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                 check=True, capture_output=True)
  env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable checkout
  probe = subprocess.run(
      [sys.executable, "-c",
       "import cai_jax, cai_jax.constitution as c; print(cai_jax.__file__);"
       " print(c.CONSTITUTIONS_DIR);"
       " print(len(c.load_constitution('harmless').critique_revision))"],
      cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  module_file, constitutions_dir, num_principles = probe.stdout.split()
  assert module_file.startswith(str(target)), module_file
  assert constitutions_dir.startswith(str(target)), constitutions_dir
  assert int(num_principles) >= 16  # the paper's 16 harmlessness principles
  run = subprocess.run(
      [sys.executable, "-m", "cai_jax.phases.p1_prompts",
       f"--config={REPO}/configs/prompts.py:tiny", "--workdir=w"],
      cwd=elsewhere, env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  for kind in ("red_team", "helpful"):
    assert (elsewhere / "w" / "p1_prompts" / f"{kind}_train.jsonl").stat().st_size > 0
