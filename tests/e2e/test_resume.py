"""Kill and resume, one case a training stage: a run stopped part-way (SIGTERM at a
step, as a cluster's preemption sends it, or `should_stop`) and rerun with the same
command ends bit for bit where the uninterrupted run ends: the same params,
optimizer state and PRNG key, the same last metrics, each step logged once, and
the files it had written read back rather than written again."""

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest

from cai_jax import records
from cai_jax.phases import p3_sft, p7_dpo, p7_ppo
from cai_jax.training.metrics import read_metrics

import test_dpo
import test_p7_ppo
import test_preference_model
import test_sft
from resume_helpers import assert_same_state, sigterm_at


@dataclasses.dataclass(frozen=True)
class Stage:
  """How one training stage is run, stopped and compared."""

  run: Callable[..., Any]  # (config, workdir, **run_kw) -> setup.Result
  prepare: Callable[[Any], Any]  # tmp_path -> config; writes full/ and resumed/'s inputs
  steps: int  # the run's length (steps, or iterations for on-policy RL)
  stop_at: int  # where the interrupted run stops
  sigterm: bool  # stopped by SIGTERM (the stage's StopFlag), else by should_stop
  logged: str  # a metric every step's row of metrics.jsonl has
  kept: tuple[str, ...] = ()  # files of the stage's output the rerun must not rewrite
  run_kw: dict = dataclasses.field(default_factory=dict)


def _sft(tmp_path):
  records_dir = str(tmp_path / "records")
  records.write_shard(records_dir, 0, test_sft.make_records())
  return test_sft.tiny_config(records_dir, num_steps=6, save_every=100, eval_every=3)


def _pairs(tiny_config):
  def prepare(tmp_path):
    for name in ("full", "resumed"):
      test_preference_model.write_labels(str(tmp_path / name),
                                         test_preference_model.marker_records(40, seed=5))
    return tiny_config(num_steps=6, save_every=100, eval_every=3)
  return prepare


def _rl(variant: str):
  def prepare(tmp_path):
    for name in ("full", "resumed"):
      test_p7_ppo.write_prompts(str(tmp_path / name))
    c = test_p7_ppo.tiny_config(iterations=3)
    test_p7_ppo._with_lora(c, variant)
    c.kl.target, c.kl.horizon = 1.0, 100  # adaptive beta: it must be restored too
    return c
  return prepare


_RL = dict(run=p7_ppo.run, steps=3, stop_at=1, sigterm=False, logged="reward",
           run_kw={"reward_fn": test_p7_ppo.target_frequency})
STAGES = {
    "sft": Stage(p3_sft.run, _sft, steps=6, stop_at=3, sigterm=True, logged="loss"),
    # The PM: the two-PM test in test_p6_preference_model stops inside its second PM.
    "dpo": Stage(p7_dpo.run, _pairs(test_dpo.tiny_config), steps=6, stop_at=3, sigterm=True,
                 logged="loss", kept=(p7_dpo.REFERENCE_FILE,)),
    # RLOO resumes through GRPO's code (critic-free: the same state, loop and data
    # position; only the advantage differs, tested in test_p7_ppo); plain PPO's resume is
    # test_p7_ppo's weighted-sources run (and the two-PM test's gated one).
    **{variant: Stage(prepare=_rl(variant), **_RL) for variant in ("grpo", "ppo+lora")},
}


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stopped_run_resumes_bit_identically(tmp_path, name):
  stage = STAGES[name]
  config = stage.prepare(tmp_path)
  full = stage.run(config, str(tmp_path / "full"), **stage.run_kw)
  assert full.status == "done" and full.step == stage.steps

  stop = (sigterm_at(stage.stop_at) if stage.sigterm
          else lambda step: step == stage.stop_at)
  part = stage.run(config, str(tmp_path / "resumed"), should_stop=stop, **stage.run_kw)
  assert part.status == "preempted" and part.step == stage.stop_at
  written = {f: os.path.getmtime(os.path.join(part.output_dir, f)) for f in stage.kept}
  resumed = stage.run(config, str(tmp_path / "resumed"), **stage.run_kw)
  assert resumed.status == "done" and resumed.step == stage.steps

  assert_same_state(full.state, resumed.state)
  untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_s")}
  assert untimed(full.metrics) == untimed(resumed.metrics)
  steps = [m["step"] for m in read_metrics(resumed.output_dir) if stage.logged in m]
  assert steps == list(range(1, stage.steps + 1))  # the resumed run's log has each step once
  for f, mtime in written.items():
    assert os.path.getmtime(os.path.join(part.output_dir, f)) == mtime, f"{f} was rewritten"
