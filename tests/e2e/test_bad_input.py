"""Bad input through the real binaries: one clear line, exit status 2, and the
outputs of earlier stages left exactly as they were; kill -9 then rerun."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cai_jax import paths, records
from cai_jax.phases import cli, p1_prompts, p2_critique_revision, p3_sft
from cai_jax.phases import p6_preference_model
from cai_jax.configs import critique_revision as cr_config
from cai_jax.configs import preference_model as pm_config
from cai_jax.configs import prompts as prompts_config
from cai_jax.configs import sft as sft_config
from conftest import TEST_XLA_OPT
from resume_helpers import shard_bytes
from test_p2_critique_revision import _config, _write_prompts
from test_preference_model import label_record
from test_sft import make_records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _phase(module: str, config: str, workdir, *overrides, timeout=300):
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {TEST_XLA_OPT}"}
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
             f"--config.red_team_sources=('{f}',)", f"--config.empty={policy}",
             # the one kept prompt falls in the held-out split (a hash of its text)
             "--config.num_red_team_train=0", "--config.num_red_team_held_out=1")
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


def test_config_file_that_does_not_load(tmp_path):
  bad = tmp_path / "cfg.py"
  bad.write_text("def get_config(:\n")
  _assert_clean_failure(_phase("p1_prompts", "prompts.py:tiny", tmp_path, f"--config={bad}"),
                        "cfg.py", "SyntaxError")
  _assert_clean_failure(_phase("p1_prompts", "prompts.py:tiny", tmp_path,
                               f"--config={tmp_path}/none.py"), "none.py", "No such file")


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
    _write_prompts(d, n_red=5, n_help=1)
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
  assert shard_bytes(out) == shard_bytes(paths.stage_dir(str(full), paths.CRITIQUE_REVISION))


def test_a_failed_start_does_not_lock_the_output_dir(tmp_path):
  import ml_collections
  d = str(tmp_path / "out")
  records.check_same_config(d, ml_collections.ConfigDict({"model": "/wrong/path"}))
  # Nothing written yet: the corrected config may claim the directory.
  records.check_same_config(d, ml_collections.ConfigDict({"model": "/right/path"}))
  records.write_shard(d, 0, [])
  with pytest.raises(ValueError, match="different config"):
    records.check_same_config(d, ml_collections.ConfigDict({"model": "/other"}))


# --- The bad-input table: every stage's input files, malformed every way -------------------------
# Each row makes one bad file and runs the stage in-process; the error must be one of the
# errors the binaries print as one line with exit status 2 (`cli.INPUT_ERRORS`), on one line,
# naming the file (and line) and what is wrong; the earlier stages' outputs must be unchanged
# and the failing stage must leave no output. Two rows also go through the real binary below.

LATIN1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8


def _prompt_file(name, data):
  def make(tmp):
    f = tmp / name
    if data is None:
      f.mkdir()
    else:
      f.write_bytes(data)
    c = prompts_config.get_config("tiny")
    c.red_team_sources = (str(f),)
    return p1_prompts.run, c, tmp / "w1", None
  return make


def _constitution(data):
  def make(tmp):
    f = tmp / "bad.yaml"
    if data is None:
      f.mkdir()
    else:
      f.write_bytes(data)
    c = cr_config.get_config("tiny")
    c.constitution, c.model = str(f), "random:tiny_llama"
    return p2_critique_revision.run, c, tmp, tmp / paths.PROMPTS
  return make


def _stage1_prompts(data):
  def make(tmp):
    (tmp / paths.PROMPTS / "red_team_train.jsonl").write_bytes(data)
    c = cr_config.get_config("tiny")
    c.model = "random:tiny_llama"
    return p2_critique_revision.run, c, tmp, tmp / paths.PROMPTS
  return make


def _shard_input(run, config, field: str, folder: str, workdir: str):
  """A stage reading one shard of `lines` from `folder`, named by its config's data.<field>."""
  def for_lines(lines):
    def make(tmp):
      d = tmp / folder
      d.mkdir()
      (d / "shard-00000.jsonl").write_bytes(lines)
      c = config.get_config("tiny")
      c.data[field] = str(d)
      return run, c, tmp / workdir, d
    return make
  return for_lines


_sft_records = _shard_input(p3_sft.run, sft_config, "records_dir", "records", "w3")
_labels = _shard_input(p6_preference_model.run, pm_config, "labels_dir", "labels", "w6")


def _record(**change):
  row = records.to_json(make_records(n_red=1, n_help=0)[0])
  row = {**json.loads(row), **change}
  for k in [k for k, v in change.items() if v is DROP]:
    del row[k]
  return (json.dumps(row) + "\n").encode()


DROP = object()


def _label(**change):
  row = json.loads(records.to_json(label_record(0, "q", "a", "b", 0.9, "red_team")))
  return (json.dumps({**row, **change}) + "\n").encode()


def _human(data):
  def make(tmp):
    d = tmp / "labels"
    d.mkdir()
    (d / "shard-00000.jsonl").write_bytes(_label())
    f = tmp / "human.jsonl"
    f.write_bytes(data)
    c = pm_config.get_config("tiny")
    c.data.labels_dir, c.data.helpful_comparisons = str(d), str(f)
    return p6_preference_model.run, c, tmp / "w6", d
  return make


GOOD_HUMAN = b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n'

BAD_INPUTS = {
    # stage 1: prompt files
    "prompts: not UTF-8": (_prompt_file("p.jsonl", b'{"prompt": "fine"}\n{"prompt": "' + LATIN1
                                        + b'"}\n'), ["p.jsonl:2", "UTF-8", "column 16", "iconv"]),
    "prompts: a JSON array line": (_prompt_file("p.jsonl", b'["How do I?"]\n'),
                                   ["p.jsonl:1", "JSON array", "object"]),
    "prompts: not JSON": (_prompt_file("p.jsonl", b'{"prompt": "x"\n'),
                          ["p.jsonl:1", "not valid JSON"]),
    "prompts: a number prompt": (_prompt_file("p.jsonl", b'{"prompt": 7}\n'),
                                 ["p.jsonl:1", "number", "string"]),
    "prompts: no prompt field": (_prompt_file("p.jsonl", b'{"text": "hi"}\n'),
                                 ["p.jsonl:1", "'prompt'", "'text'"]),
    "prompts: empty file": (_prompt_file("p.jsonl", b""), ["p.jsonl", "empty"]),
    "prompts: a directory": (_prompt_file("d.jsonl", None), ["d.jsonl", "directory"]),
    "prompts: CSV not UTF-8": (_prompt_file("p.csv", b"prompt\nfine\n" + LATIN1 + b"\n"),
                               ["p.csv:3", "UTF-8"]),
    "prompts: text not UTF-8": (_prompt_file("p.txt", LATIN1 + b"\n"), ["p.txt:1", "UTF-8"]),
    # stage 2: the constitution and stage 1's prompts
    "constitution: not UTF-8": (_constitution(b"name: x\ndescription: " + LATIN1 + b"\n"),
                                ["bad.yaml:2", "UTF-8"]),
    "constitution: a directory": (_constitution(None), ["bad.yaml", "directory"]),
    "stage-1 prompts: a JSON array line": (_stage1_prompts(b"[1, 2]\n"),
                                           ["red_team_train.jsonl:1", "JSON array"]),
    "stage-1 prompts: not UTF-8": (_stage1_prompts(LATIN1), ["red_team_train.jsonl:1", "UTF-8"]),
    # stage 3: stage 2's records
    "records: a JSON array line": (_sft_records(b"[1, 2]\n"),
                                   ["shard-00000.jsonl:1", "JSON array"]),
    "records: a string where rounds go": (_sft_records(_record(rounds="none")),
                                          ["shard-00000.jsonl:1", "'rounds'", "string", "array"]),
    "records: a field missing": (_sft_records(_record(prompt=DROP)),
                                 ["shard-00000.jsonl:1", "'prompt'", "CritiqueRevisionRecord"]),
    "records: a round not an object": (_sft_records(_record(rounds=[3])),
                                       ["shard-00000.jsonl:1", "rounds[0]"]),
    "records: not UTF-8": (_sft_records(_record()[:-3] + LATIN1 + b'"}\n'),
                           ["shard-00000.jsonl:1", "UTF-8"]),
    "records: a torn last line": (_sft_records(_record() + _record()[:40]),
                                  ["shard-00000.jsonl:2", "not valid JSON"]),
    # stage 6: stage 5's labels and the human comparison file
    "labels: p_a a string": (_labels(_label(p_a="0.9")),
                             ["shard-00000.jsonl:1", "'p_a'", "string", "number"]),
    "labels: a null line": (_labels(b"null\n"), ["shard-00000.jsonl:1", "JSON null"]),
    "labels: p_a outside [0, 1]": (_labels(_label(p_a=1.5)), ["labels", "p_a=1.5"]),
    "human comparisons: a field missing": (_human(b'{"prompt": "q", "chosen": "a"}\n'),
                                           ["human.jsonl:1", "'rejected'"]),
    "human comparisons: not UTF-8": (_human(GOOD_HUMAN + b'{"prompt": "' + LATIN1 + b'"}\n'),
                                     ["human.jsonl:2", "UTF-8"]),
    "human comparisons: a JSON array line": (_human(b'["q", "a", "b"]\n'),
                                             ["human.jsonl:1", "JSON array"]),
    "human comparisons: a number response": (
        _human(b'{"prompt": "q", "chosen": 1, "rejected": "b"}\n'),
        ["human.jsonl:1", "'chosen'", "number"]),
    "human comparisons: empty file": (_human(b"\n"), ["human.jsonl", "empty"]),
}


@pytest.mark.parametrize("row", sorted(BAD_INPUTS))
def test_bad_input_table(row, tmp_path):
  make, needles = BAD_INPUTS[row]
  run, config, workdir, earlier = make(tmp_path)
  before = _tree_hash(earlier) if earlier else None
  with pytest.raises(cli.INPUT_ERRORS) as info:
    run(config, str(workdir))
  line = cli.error_line(info.value)
  assert "\n" not in str(info.value), str(info.value)
  for n in needles:
    assert n in line, (n, line)
  if earlier:
    assert _tree_hash(earlier) == before
  stage_out = {p1_prompts.run: paths.PROMPTS, p2_critique_revision.run: paths.CRITIQUE_REVISION,
               p3_sft.run: paths.SFT, p6_preference_model.run: paths.PREFERENCE_MODEL}[run]
  assert not os.path.exists(os.path.join(workdir, stage_out, "shard-00000.jsonl"))
  assert not os.path.exists(os.path.join(workdir, stage_out, "checkpoints"))


def test_unreadable_prompt_file(tmp_path):
  if os.geteuid() == 0:
    pytest.skip("root reads every file")
  f = tmp_path / "p.jsonl"
  f.write_text('{"prompt": "x"}\n')
  f.chmod(0)
  c = prompts_config.get_config("tiny")
  c.red_team_sources = (str(f),)
  with pytest.raises(cli.INPUT_ERRORS, match="p.jsonl.*permission"):
    p1_prompts.run(c, str(tmp_path / "w"))


def test_bad_input_through_the_binaries(tmp_path):
  """The table's first row and a diverging run, as a user meets them: exit 2, one line."""
  bad = tmp_path / "p.jsonl"
  bad.write_bytes(b'{"prompt": "fine"}\n{"prompt": "' + LATIN1 + b'"}\n')
  r = _phase("p1_prompts", "prompts.py:tiny", tmp_path / "w1",
             f"--config.red_team_sources=('{bad}',)")
  _assert_clean_failure(r, "p.jsonl:2", "UTF-8")
  d = tmp_path / "records"
  records.write_shard(str(d), 0, make_records())
  r = _phase("p3_sft", "sft.py:tiny", tmp_path / "w3", f"--config.data.records_dir={d}",
             "--config.optim.lr=nan", "--config.train.num_steps=2")
  _assert_clean_failure(r, "non-finite loss", "Lower the learning rate")


def test_a_damaged_shard_is_refused_then_written_again(tmp_path):
  d = str(tmp_path / "out")
  recs = make_records(n_red=6, n_help=0)
  process = lambda chunk: list(chunk)
  assert records.run_sharded(d, recs, 2, process) == 3
  clean = shard_bytes(d)
  path = records.shard_path(d, 1)
  data = bytearray(open(path, "rb").read())
  data[10] ^= 0x01  # one flipped bit: still valid JSON, silently wrong text
  open(path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="shard-00001.jsonl fails its SHA-256 check.*rerun"):
    records.read_records(d, records.CritiqueRevisionRecord)
  assert records.run_sharded(d, recs, 2, process) == 1  # only the damaged one again
  assert shard_bytes(d) == clean
  assert len(os.listdir(d + ".damaged")) == 1
