#!/usr/bin/env bash
# pipe on a GPU: the bench at GPT-2 small shape (and the tiny shape), with model FLOPs
# utilisation, then the default pipeline end to end on the CUDA backend.
#   scripts/gpu-bench.sh                        # builds with --features cuda first
#   GPU_PIPE_BIN=/path/to/pipe scripts/gpu-bench.sh # a prebuilt cuda binary (for machines without crates.io)
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
small="--layers 12 --heads 12 --embd 768 --vocab 50257 --seq 256 --steps 6 --warmup 2"
for precision in f32 bf16; do
  # shellcheck disable=SC2086
  "$GPU_PIPE_BIN" bench --backend cuda $small --batch 4 --precision $precision | mfu
  # shellcheck disable=SC2086
  "$GPU_PIPE_BIN" bench --backend cuda $small --batch 16 --precision $precision | mfu
done
"$GPU_PIPE_BIN" bench --backend cuda --layers 4 --heads 4 --embd 256 --vocab 8192 --seq 128 --batch 8 | mfu
time "$GPU_PIPE_BIN" run pipelines/sft.toml --set run.backend=cuda --set run.name=sft-demo-cuda --set train.epochs=${EPOCHS:-30}
time "$GPU_PIPE_BIN" generate sft-demo-cuda --backend cuda --prompt "What is a language model?" --greedy --max-new-tokens 200 --json
