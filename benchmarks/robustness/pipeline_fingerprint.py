"""Fingerprint of a tiny pipeline run: hashes of every record file and of the
final parameters of each training stage.

Used to show that a refactor changes nothing a user sees: run it on two
checkouts and compare the JSON files (`--compare`).

  python -m benchmarks.robustness.pipeline_fingerprint --out=/tmp/after.json
  python -m benchmarks.robustness.pipeline_fingerprint --compare /tmp/before.json /tmp/after.json

The run is the test suite's tiny pipeline (tests/test_pipeline.py): a random
tiny Llama with a BPE tokenizer trained in-process for the generation stages,
random byte-tokenizer models for SFT and the PM. Parameters are read straight
from the Orbax checkpoints (no cai_jax code), so the reader does not depend
on the code being compared.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tests' 8-device CPU mesh (checkpoints restore onto the devices that saved them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, REPO)  # configs/ import each other as `configs.<name>`
VOLATILE_KEYS = ("seconds",)  # wall times in results.json


def _load(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_model(path: str) -> str:
  """The tests' tiny random Llama with a real BPE tokenizer, as an HF directory."""
  import jax
  sys.path.insert(0, os.path.join(REPO, "tests"))
  conftest = _load(os.path.join(REPO, "tests", "conftest.py"), "fingerprint_conftest")
  from cai_jax.checkpoints import hf
  from cai_jax.model import config as model_config
  from cai_jax.model import transformer
  tok = conftest.train_tiny_tokenizer()
  cfg = model_config.tiny_llama(vocab_size=512, bos_token_id=None, eos_token_ids=(0,),
                                pad_token_id=0, max_seq_len=2048)
  hf.save_hf(transformer.init_params(cfg, jax.random.key(0)), cfg, path, tokenizer=tok)
  return path


def run_pipeline(workdir: str, reuse_model: bool = False) -> None:
  from cai_jax import pipeline
  model = os.path.join(workdir, "_tiny_model")
  if not reuse_model:
    tiny_model(model)
  c = _load(os.path.join(REPO, "configs", "pipeline.py"), "fingerprint_pipeline").get_config(
      "tiny")
  c.critique_revision.model = model
  c.critique_revision.num_few_shot = 0
  c.ai_labels.feedback_models = (model,)
  c.ppo.model = ""
  c.ppo.reward_model = ""
  c.ppo.learner.iterations = 2
  c.ppo.data.max_prompt_len = 256
  c.ppo.rollout.batch_size = 8
  c.evaluation.models.initial = model
  c.evaluation.judge.model = model
  c.evaluation.accuracy.models = (model,)
  pipeline.run(c, workdir)


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def _params_hash(step_dir: str) -> str:
  """Hash of every array under the checkpoint's `params` item (sorted paths)."""
  import numpy as np
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"))
  import jax
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode() + str(a.dtype).encode() + a.tobytes())
  return h.hexdigest()[:16]


def fingerprint(workdir: str) -> dict[str, str]:
  """Hashes of the records (the workdir's own path replaced by "<workdir>") and params."""
  norm = lambda data: data.replace(os.path.abspath(workdir).encode(), b"<workdir>")
  out = {}
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("_"))
    rel = os.path.relpath(root, workdir)
    for name in sorted(files):
      path = os.path.join(root, name)
      key = os.path.join(rel, name)
      if name.endswith(".jsonl") and (name.startswith("shard-") or rel == "p1_prompts"
                                      or name == "comparisons.jsonl"):
        out[key] = _sha(norm(open(path, "rb").read()))
      elif name == "results.json":
        res = json.load(open(path))
        for k in VOLATILE_KEYS:
          res.pop(k, None)
        out[key] = _sha(norm(json.dumps(res, sort_keys=True).encode()))
    if os.path.basename(root) == "checkpoints":
      steps = sorted(int(d) for d in dirs if d.isdigit())
      if steps:
        out[os.path.join(rel, str(steps[-1]), "params")] = _params_hash(
            os.path.join(root, str(steps[-1])))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="write the fingerprint JSON here")
  parser.add_argument("--workdir", help="pipeline workdir (default: a temporary one)")
  parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
  parser.add_argument("--hash_only", action="store_true",
                      help="fingerprint an existing --workdir without running the pipeline")
  parser.add_argument("--rerun", action="store_true",
                      help="rerun the pipeline on an existing --workdir (e.g. one another"
                      " checkout wrote): every stage must find its outputs and resume")
  args = parser.parse_args()
  if args.compare:
    a, b = (json.load(open(p)) for p in args.compare)
    keys = sorted(set(a) | set(b))
    bad = [k for k in keys if a.get(k) != b.get(k)]
    for k in bad:
      print(f"DIFFERS {k}: {a.get(k)} vs {b.get(k)}")
    print(f"{len(keys) - len(bad)} of {len(keys)} files identical")
    sys.exit(1 if bad else 0)
  workdir = args.workdir or tempfile.mkdtemp(prefix="cai_fingerprint_")
  if not args.hash_only:
    run_pipeline(workdir, reuse_model=args.rerun)
  fp = fingerprint(workdir)
  text = json.dumps(fp, indent=1, sort_keys=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
