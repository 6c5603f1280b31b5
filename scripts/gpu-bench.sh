#!/usr/bin/env bash
# pipe on a GPU: the bench at GPT-2 small shape (and the tiny shape), with model FLOPs
# utilisation, attention by pipe's kernels and by the composite version, the GPU suite,
# data-parallel training against one device, then the default pipeline end to end on the CUDA
# backend and generation from its model.
#   scripts/gpu-bench.sh                        # builds with --features cuda first
#   GPU_PIPE_BIN=/path/to/pipe scripts/gpu-bench.sh # a prebuilt cuda binary (for machines without crates.io)
#   GPU_SUITE_BIN=/path/to/cuda-test-binary        # with it, the prebuilt GPU suite (tests/cuda.rs)
# (not PIPE_…: pipe reads every PIPE_ variable as a spec override and rejects unknown ones)
# MFU is over the card's dense peak for the arithmetic used: PEAK_TFLOPS (default an H100/H200
# SXM's 67 FP32 TFLOP/s) for f32 runs, PEAK_BF16_TFLOPS (default 989) for bf16 mixed precision.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${GPU_PIPE_BIN:-}" ]; then
  cargo build --release --features cuda
  GPU_PIPE_BIN=target/release/pipe
fi
PEAK_TFLOPS=${PEAK_TFLOPS:-67}
PEAK_BF16_TFLOPS=${PEAK_BF16_TFLOPS:-989}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mfu() {
  python3 -c "import json,sys; r=json.loads(sys.stdin.read()); t=r['train_tflops']; \
bf16=r['shape']['precision']=='bf16'; peak=$PEAK_BF16_TFLOPS if bf16 else $PEAK_TFLOPS; \
print(json.dumps(r)); print(f\"MFU: {100*t/peak:.1f}% of {peak} TFLOP/s ({'bf16' if bf16 else 'f32'} dense)\")"
}
# GPT-2 small at sequence 1024 (the issue's shape): bf16 at two batches, f32 beside it, and
# each precision once with attention's composite version against pipe's kernels.
small="--layers 12 --heads 12 --embd 768 --vocab 50257 --seq 1024 --steps 6 --warmup 2"
for run in "bf16 8 kernels" "bf16 16 kernels" "bf16 16 composite" "f32 16 kernels" "f32 16 composite"; do
  read -r precision batch attention <<< "$run"
  # shellcheck disable=SC2086
  "$GPU_PIPE_BIN" bench --backend cuda $small --batch "$batch" --precision "$precision" --gpu-attention "$attention" | mfu \
    || echo "bench failed: $run (the other figures still count)"
done
"$GPU_PIPE_BIN" bench --backend cuda --layers 4 --heads 4 --embd 256 --vocab 8192 --seq 128 --batch 8 | mfu
# The GPU suite on CUDA (tests/cuda.rs): GPU_SUITE_BIN is its test binary, built here with
# `cargo test --release --features cuda --test cuda --no-run` where no prebuilt one is given.
if [ -z "${GPU_SUITE_BIN:-}" ] && [ "$GPU_PIPE_BIN" = target/release/pipe ]; then
  GPU_SUITE_BIN=$(cargo test --release --features cuda --test cuda --no-run --message-format=json \
    | python3 -c "import json,sys; print(*[m['executable'] for m in map(json.loads, sys.stdin) \
        if m.get('executable') and m['target']['kind'] == ['test'] and m['target']['name'] == 'cuda'])")
fi
if [ -n "${GPU_SUITE_BIN:-}" ]; then
  CARGO_MANIFEST_DIR=$PWD GPU_PIPE_BIN=$(realpath "$GPU_PIPE_BIN") "$GPU_SUITE_BIN" --test-threads 1 \
    || echo "GPU suite failed (the figures above still count)"
fi
# Data-parallel training on CUDA (issue 15): one peer per GPU over every GPU there is, or, on a
# machine with one, two nodes on loopback sharing it; each peer takes half the batch, so the
# step losses must equal one device's with the whole batch (1e-5 relative, summation order).
data_parallel() {
  dp=(--set run.backend=cuda --set 'run.stages=["train"]' --set train.epochs=2)
  "$GPU_PIPE_BIN" run pipelines/sft.toml "${dp[@]}" --set run.name=dp-one --set train.batch_size=16
  gpus=$(nvidia-smi -L | wc -l)
  if [ "$gpus" -ge 2 ]; then
    devices="[$(seq -s, 0 1 $((gpus - 1)))]"
    "$GPU_PIPE_BIN" run pipelines/sft.toml "${dp[@]}" --set run.name=dp-peers --set "run.devices=$devices" \
      --set train.batch_size=$((16 / gpus))
  else
    node() {
      PIPE_DISTRIBUTED__NODES=2 PIPE_DISTRIBUTED__RANK=$1 PIPE_DISTRIBUTED__ORCHESTRATOR=127.0.0.1:47400 \
        PIPE_DISTRIBUTED__SERVE_ORCHESTRATOR=true PIPE_DISTRIBUTED__HOST=127.0.0.1 PIPE_DISTRIBUTED__PORT=$((47401 + $1)) \
        "$GPU_PIPE_BIN" run pipelines/sft.toml "${dp[@]}" --set run.name=dp-peers --set train.batch_size=8
    }
    node 0 & sleep 1; node 1; wait
  fi
  python3 - <<'PY'
import glob, json
def losses(name):
    run = sorted(glob.glob(f"runs/{name}/*/metrics.jsonl"))[-1]
    return [r["loss"] for r in map(json.loads, open(run)) if "loss" in r]
one, peers = losses("dp-one"), losses("dp-peers")
worst = max(abs(a - b) / abs(b) for a, b in zip(peers, one))
print(f"data-parallel: {len(peers)} of {len(one)} step losses, worst relative difference {worst:.2e}")
PY
}
data_parallel || echo "data-parallel check failed (the figures above still count)"
time "$GPU_PIPE_BIN" run pipelines/sft.toml --set run.backend=cuda --set run.name=sft-demo-cuda --set train.epochs=${EPOCHS:-30}
time "$GPU_PIPE_BIN" generate sft-demo-cuda --backend cuda --prompt "What is a language model?" --greedy --max-new-tokens 200 --json
