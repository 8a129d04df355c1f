#!/usr/bin/env bash
# The GPU figures of docs/performance.md; each named step has its own time limit so a
# set of them fits one 10-minute slot. Run from the repository root:
#   benchmarks/perf/gpu_suite.sh OUT_DIR decode_smollm2 decode_llama1b sft mesh ppo
#   (also: ppo_reward memory_plan cudnn_test sft_cudnn sft_cudnn_large mesh_cudnn
#    sft_1b decode_cmdbuf dpo)
# OUT_DIR is the machine's results folder, e.g. benchmarks/results/h100; each step
# writes <script>.json there, or <script>-<variant>.json beside the headline one.
# Random weights of the named architectures (the benchmarks time the same
# computation whatever the weight values; the bundled GGUF need not be there).
# Wheels in .whl/ (packages the machine lacks) are installed first when present.
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import jax, torch, transformers; print(jax.__version__, jax.devices(), torch.__version__, torch.cuda.get_device_name(), transformers.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv

run_step() {  # run_step NAME SECONDS CMD...: run with a time limit, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name"; local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -vE "Warning|warn\(|^\s*$" | tail -40
  echo "=== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
}

for name in "$@"; do
  case $name in
    # JAX and PyTorch share the GPU in the decode process.
    # Both decode loops: the layer scan (the GPU default) and unrolled layers.
    decode_smollm2) XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 run_step "$name" 300 \
      python3 -m benchmarks.perf.decode --model=random:smollm2_135m --dtype=bfloat16 \
      --batch_sizes=1,8,32,128 --decode_layers=unrolled,scan \
      --out="$out/decode.json" ;;
    decode_llama1b) XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 run_step "$name" 240 \
      python3 -m benchmarks.perf.decode --model=random:llama3_2_1b --dtype=bfloat16 \
      --batch_sizes=1,8,32,128 --decode_layers=unrolled,scan \
      --out="$out/decode-llama3_2_1b.json" ;;
    sft) run_step "$name" 260 python3 -m benchmarks.perf.sft_throughput \
      --model=random:smollm2_135m --device=gpu --dtype=bfloat16 --batch=8 --seq=512 \
      --steps=20 --warmup=3 --out="$out/sft_throughput.json" ;;
    mesh) run_step "$name" 280 python3 -m benchmarks.perf.mesh_throughput \
      --model=random:smollm2_135m --meshes='1,1,1' --batch=8 --seq_len=512 \
      --new_tokens=128 --dtype=bfloat16 --steps=5 --out="$out/mesh_throughput.json" ;;
    ppo) run_step "$name" 200 python3 -m benchmarks.perf.ppo_iteration \
      --model=random:smollm2_135m --dtype=bfloat16 --systems=cai_jax \
      --out="$out/ppo_iteration.json" ;;
    # The reward share with the PM fed token ids (stage 7's default) vs decoded text.
    ppo_reward) run_step "$name" 160 python3 -m benchmarks.perf.ppo_iteration \
      --model=random:smollm2_135m --dtype=bfloat16 --systems=cai_jax_text_reward,cai_jax \
      --out="$out/ppo_iteration-reward.json" ;;
    # The memory plan as the GPU compiles it (compare benchmarks/results/cpu/memory_plan.json).
    memory_plan) run_step "$name" 240 python3 -m benchmarks.perf.memory_plan \
      --models=llama3_2_1b,llama3_8b --stages=sft,pm,dpo,ppo --meshes=1,1,1 --batch=16 \
      --seq=2048 --out="$out/memory_plan.json" ;;
    cudnn_test) run_step "$name" 150 python3 -m pytest -q -x tests/test_gpu_attention.py ;;
    sft_cudnn) run_step "$name" 150 python3 -m benchmarks.perf.sft_throughput \
      --model=random:smollm2_135m --device=gpu --dtype=bfloat16 --attention_impl=cudnn \
      --impls=jax,jax_chunked --batch=8 --seq=512 --steps=20 --warmup=3 \
      --out="$out/sft_throughput-cudnn.json" ;;
    sft_cudnn_large) run_step "$name" 150 python3 -m benchmarks.perf.sft_throughput \
      --model=random:smollm2_135m --device=gpu --dtype=bfloat16 --attention_impl=cudnn \
      --impls=jax,torch --batch=16 --seq=1024 --steps=20 --warmup=3 \
      --out="$out/sft_throughput-cudnn_b16_t1024.json" ;;
    mesh_cudnn) run_step "$name" 150 python3 -m benchmarks.perf.mesh_throughput \
      --model=random:smollm2_135m --meshes='1,1,1' --batch=16 --seq_len=1024 \
      --workloads=sft,pm,ppo --dtype=bfloat16 --attention_impl=cudnn --steps=5 \
      --out="$out/mesh_throughput-cudnn.json" ;;
    # The MFU figure: Llama-3.2-1B, 16 x 2048, bf16, cuDNN attention, no remat;
    # ours (logits in chunks), the PyTorch loop, and ours with rank-16 LoRA, one process each.
    sft_1b) run_step "$name" 190 python3 -m benchmarks.perf.sft_throughput \
      --model=random:llama3_2_1b --device=gpu --dtype=bfloat16 --attention_impl=cudnn \
      --impls=jax_chunked,torch,jax_lora --loss_chunk=256 --batch=16 --seq=2048 --steps=8 \
      --warmup=2 --out="$out/sft_throughput-llama1b_b16_t2048.json" ;;
    # Decode at batch 1 under XLA's default command buffers, with none, and with the
    # while/conditional loops captured too (SmolLM2 is launch-bound at batch 1).
    decode_cmdbuf)
      for v in default:"" off:"--xla_gpu_enable_command_buffer=" \
          loops:"--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"; do
        XLA_FLAGS="${v#*:}" run_step "$name.${v%%:*}" 45 python3 -m benchmarks.perf.decode \
          --model=random:smollm2_135m --dtype=bfloat16 --batch_sizes=1 --torch=false \
          --decode_layers=unrolled,scan --repeats=3 --out="$out/decode-cmdbuf_${v%%:*}.json"
      done ;;
    # DPO step against TRL's DPOTrainer (precomputed reference log-probs), bf16 on the GPU.
    dpo) run_step "$name" 95 python3 -m benchmarks.perf.dpo_step --model=random:smollm2_135m \
      --device=gpu --dtype=bfloat16 --impls=jax,trl --batch=8 --steps=10 --warmup=2 \
      --out="$out/dpo_step.json" ;;
    *) echo "unknown step $name"; exit 2 ;;
  esac
done
