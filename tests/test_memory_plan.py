"""benchmarks/memory_plan.py compiles each stage's real train step on abstract
inputs: on a tiny model every stage compiles, and the figures add up."""

import pytest

from benchmarks import memory_plan


@pytest.mark.parametrize("stage", ["sft", "pm", "dpo", "ppo"])
def test_every_stage_plans_on_a_tiny_model(stage):
  r = memory_plan.plan_one("tiny_llama", stage, (1, 2, 1), batch=4, seq=32, dtype="float32",
                           remat="none", param_dtype="", microbatches=1)
  # Arguments hold the state (params + two Adam moments, fp32, half per device on
  # fsdp 2) and the batch; all of the state is donated.
  state_gib = 3 * 4 * r["params_b"] * 1e9 / 2 / 2**30
  assert state_gib <= r["argument_gib"] < 1.2 * state_gib + 1e-3
  assert r["alias_gib"] >= 0.99 * state_gib
  assert r["temp_gib"] > 0 and r["peak_gib"] >= r["argument_gib"]
  assert ("reference_gib" in r) == (stage == "ppo")
