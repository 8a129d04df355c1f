"""The KL coefficient's effect on the tiny RL run of tests/e2e/test_p7_ppo.py: PPO and
RLOO, lr 3e-3 and 1e-3, beta 0 and 2 (k3 estimator), 8 iterations of 4 epochs; prints the
KL per sequence and the reward of every iteration. Run from the repository root:

  python experiments/2026-12-07-mutation-score/beta_sweep.py > beta_sweep.log
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "e2e")]

from cai_jax.phases import p7_ppo  # noqa: E402
from cai_jax.training.metrics import read_metrics  # noqa: E402
from test_p7_ppo import _with_lora, target_frequency, tiny_config, write_prompts  # noqa: E402

for algorithm in ("ppo", "rloo"):
  for lr in (3e-3, 1e-3):
    for beta in (0.0, 2.0):
      workdir = tempfile.mkdtemp()
      write_prompts(workdir)
      c = tiny_config(iterations=8, epochs=4)
      _with_lora(c, algorithm)
      c.kl.estimator, c.kl.coef = "k3", beta
      c.optim.lr, c.train.save_every = lr, 100
      log = read_metrics(p7_ppo.run(c, workdir, reward_fn=target_frequency).output_dir)
      print(algorithm, lr, beta, [round(m["kl"], 2) for m in log],
            [round(m["reward"], 3) for m in log], flush=True)
