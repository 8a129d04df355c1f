"""A memory plan: what each training stage's compiled step needs per device, from
XLA's own analysis, for a model config and mesh, with nothing allocated
(`cai_jax.memory_plan`: how it is computed and what it leaves out).

  python -m benchmarks.perf.memory_plan --models=llama3_2_1b,llama3_8b --stages=sft,pm,dpo,ppo \
      --meshes=1,1,1:1,8,1 --batch=16 --seq=2048  # -> benchmarks/results/cpu/memory_plan.json
  python -m benchmarks.perf.memory_plan --lora_rank=16  # -> .../memory_plan-lora16.json

Every stage is planned with SFT's sharding rules and optimizer (`configs/sft.py`).
Multi-device meshes need that many devices: on CPU set
XLA_FLAGS=--xla_force_host_platform_device_count=8 (this script sets it when
unset).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app, flags  # noqa: E402

from benchmarks.common import outputs  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["llama3_2_1b", "llama3_8b"], "Model presets.")
_STAGES = flags.DEFINE_list("stages", ["sft", "pm", "dpo", "ppo"], "Stages to plan.")
_MESHES = flags.DEFINE_string("meshes", "1,1,1:1,8,1", "(data,fsdp,tensor) shapes, ':'-separated.")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences (PM/DPO: pairs) per step.")
_SEQ = flags.DEFINE_integer("seq", 2048, "Tokens per sequence.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_REMAT = flags.DEFINE_string("remat", "full", "ModelConfig.remat.")
_PARAM_DTYPE = flags.DEFINE_string(
    "param_dtype", "", "Params and Adam moments; '' = the checkpoint's (bfloat16 for the"
    " Llama presets), as the stages load them.")
_MICROBATCHES = flags.DEFINE_integer("microbatches", 1, "Microbatches per step.")
_CHUNK = flags.DEFINE_integer("attention_chunk", 0, "ModelConfig.attention_chunk: queries per"
                              " rematerialised chunk (0: the whole sequence, [B, N, T, T] scores).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "> 0: LoRA adapters of this rank (sft, pm,"
                                  " dpo and ppo).")
_OUT = flags.DEFINE_string("out", "", "Write the rows as JSON here (default: benchmarks/results/"
                           "<machine>/memory_plan[-lora<rank>][-chunk<n>].json).")


def main(argv) -> None:
  del argv
  import jax
  import ml_collections

  from cai_jax import memory_plan
  from cai_jax.configs import common, sft as sft_config
  rules = common.FSDP_RULES
  optim_config = ml_collections.ConfigDict(sft_config.get_config("cpu").optim.to_dict())
  variant = "-".join(([f"lora{_LORA_RANK.value}"] if _LORA_RANK.value else [])
                     + ([f"chunk{_CHUNK.value}"] if _CHUNK.value else []))
  out = outputs.path("memory_plan", _OUT.value, variant)
  rows = []
  for name in _MODELS.value:
    for stage in _STAGES.value:
      for mesh in _MESHES.value.split(":"):
        shape = tuple(int(x) for x in mesh.split(","))
        r = memory_plan.plan_stage(
            name, stage, shape, rules=rules, optim_config=optim_config, batch=_BATCH.value,
            seq=_SEQ.value, dtype=_DTYPE.value, remat=_REMAT.value,
            param_dtype=_PARAM_DTYPE.value, microbatches=_MICROBATCHES.value,
            attention_chunk=_CHUNK.value, lora_rank=_LORA_RANK.value)
        rows.append(r)
        print(f"{name:12s} {stage:4s} mesh {mesh:7s}: peak {r['peak_gib']:8.2f} GiB/device"
              f" (args {r['argument_gib']:.2f}, temp {r['temp_gib']:.2f}); fits:"
              f" {', '.join(r['fits']) or 'none of ' + ', '.join(memory_plan.DEVICES_GIB)}"
              f" [{r['compile_s']} s to compile]", flush=True)
  print(outputs.write(out, {"backend": jax.default_backend(),
                            "device_kind": jax.devices()[0].device_kind,
                            "devices_gib": memory_plan.DEVICES_GIB, "rows": rows}))


if __name__ == "__main__":
  app.run(main)
