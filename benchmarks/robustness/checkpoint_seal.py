"""What verified checkpoints cost: Orbax's save vs the seal (SHA-256 of every
file of the step) and the check on restore, for a train state of a given size.

  python -m benchmarks.robustness.checkpoint_seal --params_m=135 --repeats=3

The state is SmolLM2-135M-sized by default: params and two Adam moments in
float32 (3 x 4 bytes per parameter). Each repeat saves a fresh step through
`cai_jax.training.checkpoint.Checkpointer` (async, as training does), waits for
it, then times `seal` and `check_seal` of that step on their own, and the
restore. The seal runs once per saved step on process 0 while training goes on
(after the save is on disk); the check runs once per resume.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import outputs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--params_m", type=float, default=135.0, help="millions of params")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", help="where to write (default: a temporary directory)")
  parser.add_argument("--out", default="", help="write the figures as JSON here (default:"
                      " benchmarks/results/<machine>/checkpoint_seal.json)")
  args = parser.parse_args()
  from cai_jax.training import checkpoint
  from cai_jax.training.optim import TrainState

  n = int(args.params_m * 1e6)
  leaves = 30  # like a 30-layer model's stacked weights, split into a few arrays
  shape = (leaves, n // leaves)
  key = jax.random.key(0)
  params = {"w": jax.random.normal(key, shape, jnp.float32)}
  opt = {"mu": params["w"] * 0.1, "nu": params["w"] * params["w"]}
  state = TrainState(step=jnp.int32(0), params=params, opt_state=opt, key=key)
  nbytes = sum(x.nbytes for x in jax.tree.leaves((params, opt)))
  root = args.dir or tempfile.mkdtemp(prefix="cai_seal_")
  rows = []
  try:
    for r in range(args.repeats):
      d = os.path.join(root, f"r{r}")
      ckpt = checkpoint.Checkpointer(d, max_to_keep=None)
      t0 = time.perf_counter()
      ckpt.save(state, {"r": r}, force=True)
      t_return = time.perf_counter() - t0
      ckpt._manager.wait_until_finished()  # orbax alone: the step is on disk
      t_disk = time.perf_counter() - t0
      step_dir = ckpt.step_dir(0)
      t1 = time.perf_counter()
      checkpoint.seal(step_dir)
      t_seal = time.perf_counter() - t1
      t2 = time.perf_counter()
      assert checkpoint.check_seal(step_dir) is None
      t_check = time.perf_counter() - t2
      ckpt.close()
      t3 = time.perf_counter()
      abstract = jax.eval_shape(lambda: state)
      with checkpoint.Checkpointer(d) as again:  # opening checks the newest seal
        again.restore(abstract)
      t_restore = time.perf_counter() - t3
      rows.append({"save_returns_s": t_return, "save_on_disk_s": t_disk, "seal_s": t_seal,
                   "check_s": t_check, "open_check_restore_s": t_restore})
      shutil.rmtree(d)
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)
  med = {k: float(np.median([row[k] for row in rows])) for k in rows[0]}
  out = {"params_m": args.params_m, "state_gib": nbytes / 2**30, "repeats": args.repeats,
         "median": med, "rows": rows,
         "seal_gib_per_s": nbytes / 2**30 / med["seal_s"],
         "seal_over_orbax_save": med["seal_s"] / med["save_on_disk_s"],
         "check_over_restore": med["check_s"] / max(med["open_check_restore_s"] - med["check_s"],
                                                    1e-9)}
  print(json.dumps(out, indent=1))
  print(outputs.write(outputs.path("checkpoint_seal", args.out), out))


if __name__ == "__main__":
  main()
