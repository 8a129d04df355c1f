"""Does KV memory limit the engine's slot count on one 80 GB GPU? (issue 38, paged KV)

  python -m benchmarks.perf.kv_slots   # -> benchmarks/results/cpu/kv_slots.json

For the 1B and 8B presets and rollout lengths of 2,048 and 8,192 tokens: the KV cache one
slot holds (2 x layers x kv_heads x head_dim x bytes x length, bf16), the memory stage 7
already holds on one device during a rollout (the memory plan's PPO row,
`benchmarks/results/cpu/memory_plan.json`: its arguments, i.e. the policy's train state
and the batch, plus the frozen reference in bf16), and how many slots the rest of an
80 GB GPU holds with the engine's slot array (every slot reserves its full length) and
with a page pool at the mean rollout length (what paging would buy: slots sized by what
they use). Arithmetic from the model configs and the plan; nothing is allocated.
"""

from __future__ import annotations

import json

from absl import app, flags

from benchmarks.common import outputs
from cai_jax.model import config as model_config

_PLAN = flags.DEFINE_string("plan", "benchmarks/results/cpu/memory_plan.json",
                            "The memory plan whose one-device PPO rows to use.")
_GPU_GIB = flags.DEFINE_float("gpu_gib", 80.0, "Device memory (GiB).")
_LENGTHS = flags.DEFINE_list("lengths", ["2048", "8192"], "Prompt + rollout tokens per slot.")
_MEAN_SHARE = flags.DEFINE_float("mean_share", 0.5, "Mean used length over the longest (a"
                                 " page pool's gain; 0.5 ~ the CAI run's 0.23-0.32 idle share"
                                 " at 64 tokens, larger at long caps).")
_OUT = flags.DEFINE_string("out", "", "Write results JSON here (default:"
                           " benchmarks/results/<machine>/kv_slots.json).")
GIB = 1024 ** 3


def main(argv):
  del argv
  with open(_PLAN.value) as f:
    plan = {r["model"]: r for r in json.load(f)["rows"]
            if r["stage"] == "ppo" and r["devices"] == 1}
  rows = []
  for preset in ("llama3_2_1b", "llama3_8b"):
    cfg = model_config.PRESETS[preset]()
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # bf16
    reference = cfg.num_params() * 2 / GIB
    held = plan[preset]["argument_gib"] + reference
    left = _GPU_GIB.value - held
    for length in (int(x) for x in _LENGTHS.value):
      per_slot = kv_per_token * length / GIB
      row = {"model": preset, "length": length, "kv_per_token_kib": kv_per_token / 1024,
             "kv_per_slot_gib": per_slot, "held_gib": held, "left_gib": left,
             "slots_slot_array": max(int(left // per_slot), 0),
             "slots_page_pool": max(int(left // (per_slot * _MEAN_SHARE.value)), 0)}
      rows.append(row)
      print(json.dumps(row))
  print(outputs.write(outputs.path("kv_slots", _OUT.value, device_kind="cpu"),
                      {"gpu_gib": _GPU_GIB.value, "mean_share": _MEAN_SHARE.value,
                       "plan": _PLAN.value, "rows": rows}))


if __name__ == "__main__":
  app.run(main)
