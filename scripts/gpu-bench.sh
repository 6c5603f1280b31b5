#!/usr/bin/env bash
# pipe on a GPU: the bench at GPT-2 small shape (and the tiny shape), with model FLOPs
# utilisation, then the default pipeline end to end on the CUDA backend.
#   scripts/gpu-bench.sh                        # builds with --features cuda first
#   GPU_PIPE_BIN=/path/to/pipe scripts/gpu-bench.sh # a prebuilt cuda binary (for machines without crates.io)
# (not PIPE_…: pipe reads every PIPE_ variable as a spec override and rejects unknown ones)
# PEAK_TFLOPS is the card's dense peak for the arithmetic used; pipe trains in f32, so the
# default is an H100 SXM's 67 FP32 TFLOP/s (its bf16 tensor-core peak, 989, is printed too).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${GPU_PIPE_BIN:-}" ]; then
  cargo build --release --features cuda
  GPU_PIPE_BIN=target/release/pipe
fi
PEAK_TFLOPS=${PEAK_TFLOPS:-67}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mfu() {
  python3 -c "import json,sys; r=json.loads(sys.stdin.read()); t=r['train_tflops']; \
print(json.dumps(r)); print(f\"MFU: {100*t/$PEAK_TFLOPS:.1f}% of $PEAK_TFLOPS TFLOP/s (f32), {100*t/989:.2f}% of 989 (bf16 dense)\")"
}
"$GPU_PIPE_BIN" bench --backend cuda --layers 12 --heads 12 --embd 768 --vocab 50257 --seq 256 --batch 4 --steps 6 --warmup 2 | mfu
"$GPU_PIPE_BIN" bench --backend cuda --layers 12 --heads 12 --embd 768 --vocab 50257 --seq 256 --batch 16 --steps 6 --warmup 2 | mfu
"$GPU_PIPE_BIN" bench --backend cuda --layers 4 --heads 4 --embd 256 --vocab 8192 --seq 128 --batch 8 | mfu
time "$GPU_PIPE_BIN" run pipelines/sft.toml --set run.backend=cuda --set run.name=sft-demo-cuda --set train.epochs=${EPOCHS:-30}
