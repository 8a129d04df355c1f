"""cai_jax.memory_plan compiles each stage's real train step on abstract inputs: on a
tiny model every stage compiles, and the figures add up."""

import functools

import pytest

from cai_jax import memory_plan
from cai_jax.configs import common, sft as sft_config

KW = dict(rules=common.FSDP_RULES, optim_config=sft_config.get_config("cpu").optim,
          batch=4, seq=32, dtype="float32", remat="none", param_dtype="", microbatches=1)


@functools.cache
def full_plan(stage: str) -> dict:
  """Each stage's plan without LoRA, compiled once for both tests."""
  return memory_plan.plan_stage("tiny_llama", stage, (1, 2, 1), **KW)


@pytest.mark.parametrize("stage", ["sft", "pm", "dpo", "ppo"])
def test_every_stage_plans_on_a_tiny_model(stage):
  r = full_plan(stage)
  # Arguments hold the state (params + two Adam moments, fp32, half per device on
  # fsdp 2) and the batch; all of the state is donated.
  state_gib = 3 * 4 * r["params_b"] * 1e9 / 2 / 2**30
  assert state_gib <= r["argument_gib"] < 1.2 * state_gib + 1e-3
  assert r["alias_gib"] >= 0.99 * state_gib
  assert r["temp_gib"] > 0 and r["peak_gib"] >= r["argument_gib"]
  assert ("reference_gib" in r) == (stage == "ppo")


@pytest.mark.parametrize("stage", ["sft", "pm", "dpo", "ppo"])
def test_lora_plans_hold_the_base_once_and_adapter_state_only(stage):
  full = full_plan(stage)
  r = memory_plan.plan_stage("tiny_llama", stage, (1, 2, 1), lora_rank=4, **KW)
  base_gib = 4 * r["params_b"] * 1e9 / 2 / 2**30  # the fp32 base, half per device
  adapter_state_gib = 3 * 4 * r["trainable_b"] * 1e9 / 2 / 2**30
  assert 0 < r["trainable_b"] < 0.2 * r["params_b"]
  # Arguments: the base once (DPO, PPO: also the reference) + adapters and their moments.
  assert base_gib + adapter_state_gib <= r["argument_gib"] < 1.2 * (base_gib + adapter_state_gib)
  assert "reference_gib" not in r and r["peak_gib"] < full["peak_gib"]
  with pytest.raises(ValueError, match="sft, pm, dpo and ppo"):
    memory_plan.plan_stage("tiny_llama", "decode", (1, 2, 1), lora_rank=4, **KW)
