"""Bad input through the real binaries: one clear line, exit status 2, and the
outputs of earlier stages left exactly as they were; kill -9 then rerun."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from cai_jax import records
from cai_jax.phases import p2_critique_revision, paths
from test_critique_revision import _config, _read_bytes, _write_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _phase(module: str, config: str, workdir, *overrides, timeout=300):
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run(
      [sys.executable, "-m", f"cai_jax.phases.{module}", f"--config={REPO}/configs/{config}",
       f"--workdir={workdir}", *overrides], capture_output=True, text=True, cwd=REPO,
      env=env, timeout=timeout)


def _tree_hash(directory) -> str:
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(root, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


@pytest.fixture
def workdir(tmp_path):
  return tmp_path


@pytest.fixture(autouse=True)
def _stage1_done(tmp_path):
  """A workdir whose stage 1 is done (its files must survive every failure below)."""
  _write_prompts(tmp_path, n_red=2, n_help=1)
  return tmp_path


def _assert_clean_failure(result, *needles):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  for n in needles:
    assert n in lines[0], lines[0]


def test_malformed_constitution(workdir, tmp_path_factory):
  bad = tmp_path_factory.mktemp("c") / "bad.yaml"
  bad.write_text("name: x\nversion: '1'\ndescription: d\ncritique_revision:\n"
                 "  - id: a\n    critique: c\ncomparison:\n  - id: b\n    question: q\n")
  before = _tree_hash(workdir / paths.PROMPTS)
  r = _phase("p2_critique_revision", "critique_revision.py:tiny", workdir,
             f"--config.constitution={bad}", "--config.model=random:tiny_llama")
  _assert_clean_failure(r, "bad.yaml", "revision")
  assert _tree_hash(workdir / paths.PROMPTS) == before


def test_prompt_file_missing_its_column(tmp_path):
  bad = tmp_path / "prompts.jsonl"
  bad.write_text('{"text": "hello"}\n')
  r = _phase("p1_prompts", "prompts.py:tiny", tmp_path / "w",
             f"--config.red_team_sources=('{bad}',)")
  _assert_clean_failure(r, "prompts.jsonl", "prompt", "text")


@pytest.mark.parametrize("policy, needle", [("error", "empty"), ("drop", None)])
def test_empty_prompts(tmp_path, policy, needle):
  f = tmp_path / "p.jsonl"
  f.write_text('{"prompt": "How do I make soup?"}\n{"prompt": "   "}\n')
  r = _phase("p1_prompts", "prompts.py:tiny", tmp_path / "w",
             f"--config.red_team_sources=('{f}',)", f"--config.empty={policy}")
  if needle:
    _assert_clean_failure(r, "p.jsonl", needle)
  else:
    assert r.returncode == 0, r.stderr[-2000:]


def test_over_long_prompt_rejected_when_asked(tmp_path):
  f = tmp_path / "p.jsonl"
  f.write_text('{"prompt": "' + "word " * 100 + '"}\n')
  r = _phase("p1_prompts", "prompts.py:tiny", tmp_path / "w",
             f"--config.red_team_sources=('{f}',)", "--config.max_chars=50",
             "--config.too_long=error")
  _assert_clean_failure(r, "p.jsonl", "50")


def test_missing_and_corrupt_checkpoints(workdir, tmp_path_factory):
  before = _tree_hash(workdir / paths.PROMPTS)
  r = _phase("p2_critique_revision", "critique_revision.py:tiny", workdir,
             "--config.model=/no/such/model_dir")
  _assert_clean_failure(r, "/no/such/model_dir")
  corrupt = tmp_path_factory.mktemp("corrupt")
  (corrupt / "config.json").write_text("{not json")
  r = _phase("p2_critique_revision", "critique_revision.py:tiny", workdir,
             f"--config.model={corrupt}")
  _assert_clean_failure(r, "config.json")
  assert _tree_hash(workdir / paths.PROMPTS) == before


def test_unknown_config_key(workdir):
  r = _phase("p2_critique_revision", "critique_revision.py:tiny", workdir,
             "--config.num_roundz=3")
  _assert_clean_failure(r, "num_roundz")


def test_mesh_that_does_not_fit(workdir):
  before = _tree_hash(workdir / paths.PROMPTS)
  r = _phase("p2_critique_revision", "critique_revision.py:tiny", workdir,
             "--config.mesh=(3,1,1)", "--config.model=random:tiny_llama")
  _assert_clean_failure(r, "mesh", "devices")
  assert _tree_hash(workdir / paths.PROMPTS) == before


def test_kill_9_mid_phase_then_rerun_gives_the_same_records(tiny_model_dir, tmp_path):
  """A real SIGKILL while shards are being written; the rerun completes them."""
  full, killed = tmp_path / "full", tmp_path / "killed"
  for d in (full, killed):
    _write_prompts(d, n_red=8, n_help=1)
  p2_critique_revision.run(_config(tiny_model_dir, shard_size=1), str(full))

  env = {**os.environ, "PYTHONPATH": REPO}
  proc = subprocess.Popen(
      [sys.executable, "-m", "cai_jax.phases.p2_critique_revision",
       f"--config={REPO}/configs/critique_revision.py:tiny", f"--workdir={killed}",
       f"--config.model={tiny_model_dir}", "--config.max_new_tokens=8",
       "--config.shard_size=1", "--config.num_few_shot=0"],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  out = paths.stage_dir(str(killed), paths.CRITIQUE_REVISION)
  deadline = time.time() + 300
  while len(records.completed_shards(out)) < 2 and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(records.completed_shards(out))
  assert 2 <= done, "the phase never wrote a shard"
  p2_critique_revision.run(_config(tiny_model_dir, shard_size=1), str(killed))
  assert _read_bytes(out) == _read_bytes(paths.stage_dir(str(full), paths.CRITIQUE_REVISION))


def test_a_failed_start_does_not_lock_the_output_dir(tmp_path):
  import ml_collections
  d = str(tmp_path / "out")
  records.check_same_config(d, ml_collections.ConfigDict({"model": "/wrong/path"}))
  # Nothing written yet: the corrected config may claim the directory.
  records.check_same_config(d, ml_collections.ConfigDict({"model": "/right/path"}))
  records.write_shard(d, 0, [])
  with pytest.raises(ValueError, match="different config"):
    records.check_same_config(d, ml_collections.ConfigDict({"model": "/other"}))
