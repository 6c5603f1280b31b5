#!/usr/bin/env bash
# pipe on a GPU, in one call: the bench at GPT-2 small shape (sequence 1024) with model FLOPs
# utilisation, in bf16 and f32, attention by pipe's kernels and by the composite version, the
# PyTorch reference at the same shapes beside it, the GPU suite, data-parallel training against
# one device, then the default pipeline end to end on the CUDA backend and generation from it.
#   scripts/gpu-bench.sh                            # builds with --features cuda first
#   GPU_PIPE_BIN=/path/to/pipe scripts/gpu-bench.sh # a prebuilt cuda binary (for machines without crates.io)
#   GPU_SUITE_BIN=/path/to/cuda-test-binary         # with it, the prebuilt GPU suite (tests/cuda.rs)
#   TORCH_REF=/path/to/torch_ref.py                 # the PyTorch reference (scripts/torch_ref.py), run
#                                                   # where python3 has torch and transformers
#   GPU_OUT=folder                                  # where the log and results go (target/gpu-bench)
#   GPU_BUDGET=seconds                              # the whole script's time (default 540): steps
#                                                   # that would run past it are cut short or skipped
# (not PIPE_…: pipe reads every PIPE_ variable as a spec override and rejects unknown ones)
# Every step has a time limit, the script a deadline, and a failing step does not stop the
# others, so one call on a lent machine returns every figure it could take. burn autotunes each
# matmul shape the first time it meets it (minutes at GPT-2 small's shapes) and keeps the
# choices in target/autotune/ (under the folder holding Cargo.toml); the script ends by packing
# them into autotune.tgz beside its results, so a later call can unpack it into target/ and carry
# it, and spend its time measuring instead. MFU is over the card's dense peak for the
# arithmetic used: PEAK_TFLOPS (default an H100/H200 SXM's 67 FP32 TFLOP/s) for f32 runs,
# PEAK_BF16_TFLOPS (default 989) for bf16 mixed precision.
set -uo pipefail
cd "$(dirname "$0")/.."
built_here=
if [ -z "${GPU_PIPE_BIN:-}" ]; then
  cargo build --release --features cuda || exit 1
  GPU_PIPE_BIN=target/release/pipe
  built_here=1
fi
GPU_PIPE_BIN=$(realpath "$GPU_PIPE_BIN")
out=${GPU_OUT:-target/gpu-bench}
mkdir -p "$out"
PEAK_TFLOPS=${PEAK_TFLOPS:-67}
PEAK_BF16_TFLOPS=${PEAK_BF16_TFLOPS:-989}

deadline=$(($(date +%s) + ${GPU_BUDGET:-540}))

# step NAME SECONDS COMMAND...: runs COMMAND (a program or one of the functions below) under a
# time limit, cut to what is left before the deadline, and says how it ended.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  if [ $((deadline - start)) -lt "$limit" ]; then limit=$((deadline - start)); fi
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped (the script's time is spent)"
    return
  fi
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@"
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - start))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
# NVRTC, which compiles pipe's and burn's kernels at run time: the toolkit's or a wheel's.
if ! ldconfig -p | grep -q 'libnvrtc\.so'; then
  for lib in $(find /usr/local /opt /usr/lib -name 'libnvrtc.so*' 2>/dev/null); do
    export LD_LIBRARY_PATH=$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "NVRTC: $lib"
    break
  done
fi

# bench ARGS...: one pipe bench line into bench.jsonl, with its MFU.
bench() {
  "$GPU_PIPE_BIN" bench --backend cuda "$@" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); \
t=r['train_tflops']; bf16=r['shape']['precision']=='bf16'; peak=$PEAK_BF16_TFLOPS if bf16 else $PEAK_TFLOPS; \
r['mfu']=round(t/peak,4); print(json.dumps(r)); open('$out/bench.jsonl','a').write(json.dumps(r)+'\n'); \
print(f\"MFU: {100*t/peak:.1f}% of {peak} TFLOP/s ({'bf16' if bf16 else 'f32'} dense)\")"
}
# torch ARGS...: the PyTorch reference at the same shape on the same GPU, into torch.jsonl.
torch_ref() {
  python3 scripts/torch_ref_cuda.py "$TORCH_REF" "$@" | tee -a "$out/torch.jsonl"
}
export -f bench torch_ref
export GPU_PIPE_BIN out PEAK_TFLOPS PEAK_BF16_TFLOPS TORCH_REF=${TORCH_REF:-scripts/torch_ref.py}

# The tiny shape first: it compiles most kernels quickly, so a broken toolchain shows at once.
step "bench tiny f32" 120 bench --layers 4 --heads 4 --embd 256 --vocab 8192 --seq 128 --batch 8
# GPT-2 small at sequence 1024 (the issue's shape): bf16 and f32, attention by pipe's kernels
# and by the composite version (the PyTorch reference at the same shapes comes last, timed
# alone once the suite is done).
shape=(--layers 12 --heads 12 --embd 768 --vocab 50257 --seq 1024)
small=("${shape[@]}" --steps 6 --warmup 2)
for run in "bf16 16 kernels" "bf16 16 composite" "f32 16 kernels" "f32 16 composite"; do
  read -r precision batch attention <<< "$run"
  step "bench small $run" 300 bench "${small[@]}" --batch "$batch" --precision "$precision" --gpu-attention "$attention"
done

# The Llama family at the shapes people fine-tune (torch_ref.py --arch llama takes the same
# flags, `--arch` being pipe's `--family`): SmolLM2-135M and Qwen2.5-0.5B in bf16, sequence 1024.
smollm2=(--arch llama --layers 30 --embd 576 --heads 9 --kv-heads 3 --inner 1536 --vocab 49152 --seq 1024)
qwen25=(--arch llama --layers 24 --embd 896 --heads 14 --kv-heads 2 --inner 4864 --vocab 151936 --seq 1024)
step "bench smollm2-135m bf16" 240 bench "${smollm2[@]}" --steps 6 --warmup 2 --batch 8 --precision bf16
step "bench qwen2.5-0.5b bf16" 300 bench "${qwen25[@]}" --steps 6 --warmup 2 --batch 4 --precision bf16

# The GPU suite on CUDA (tests/cuda.rs) in the background while the untimed steps run:
# GPU_SUITE_BIN is its test binary, built with
# `cargo test --release --features cuda --test cuda --no-run` where no prebuilt one is given.
if [ -z "${GPU_SUITE_BIN:-}" ] && [ -n "$built_here" ]; then
  GPU_SUITE_BIN=$(cargo test --release --features cuda --test cuda --no-run --message-format=json \
    | python3 -c "import json,sys; print(*[m['executable'] for m in map(json.loads, sys.stdin) \
        if m.get('executable') and m['target']['kind'] == ['test'] and m['target']['name'] == 'cuda'])")
fi
if [ -n "${GPU_SUITE_BIN:-}" ]; then
  CARGO_MANIFEST_DIR=$PWD GPU_PIPE_BIN=$GPU_PIPE_BIN \
    step "GPU suite" "${SUITE_LIMIT:-300}" "$GPU_SUITE_BIN" --test-threads 1 > "$out/suite.log" 2>&1 &
  suite=$!
fi

# Data-parallel training on CUDA: one peer per GPU over every GPU there is, or, on a machine
# with one, two nodes on loopback sharing it; each peer takes half the batch, so the step
# losses must equal one device's with the whole batch (1e-5 relative, summation order).
data_parallel() {
  local dp=(--set run.backend=cuda --set 'run.stages=["train"]' --set train.epochs=2)
  "$GPU_PIPE_BIN" run pipelines/sft.toml "${dp[@]}" --set run.name=dp-one --set train.batch_size=16 || return 1
  local gpus
  gpus=$(nvidia-smi -L | wc -l)
  if [ "$gpus" -ge 2 ]; then
    "$GPU_PIPE_BIN" run pipelines/sft.toml "${dp[@]}" --set run.name=dp-peers \
      --set "run.devices=[$(seq -s, 0 $((gpus - 1)))]" --set train.batch_size=$((16 / gpus)) || return 1
  else
    node() {
      PIPE_DISTRIBUTED__NODES=2 PIPE_DISTRIBUTED__RANK=$1 PIPE_DISTRIBUTED__ORCHESTRATOR=127.0.0.1:47400 \
        PIPE_DISTRIBUTED__SERVE_ORCHESTRATOR=true PIPE_DISTRIBUTED__HOST=127.0.0.1 PIPE_DISTRIBUTED__PORT=$((47401 + $1)) \
        "$GPU_PIPE_BIN" run pipelines/sft.toml "${dp[@]}" --set run.name=dp-peers --set train.batch_size=8
    }
    node 0 & sleep 1; node 1; wait || return 1
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
export -f data_parallel
step "data-parallel" 150 data_parallel
step "default pipeline" 120 "$GPU_PIPE_BIN" run pipelines/sft.toml --set run.backend=cuda --set run.name=sft-demo-cuda \
  --set train.epochs="${EPOCHS:-10}"
step "generate" 60 "$GPU_PIPE_BIN" generate sft-demo-cuda --backend cuda --prompt "What is a language model?" \
  --greedy --max-new-tokens 200 --json
# More than the card holds: refused before allocating, naming what to lower (exit 2).
step "beyond memory" 60 "$GPU_PIPE_BIN" bench --backend cuda "${shape[@]}" --batch 4096 --steps 1 --warmup 0
if [ -n "${suite:-}" ]; then
  wait "$suite"
  grep -E '^test |^== |test result|panicked|assert' "$out/suite.log" | head -80
fi
# The PyTorch reference at the same shapes, on the same card.
if python3 -c 'import torch, transformers' 2> /dev/null; then
  step "torch small bf16 eager" 90 torch_ref "${small[@]}" --batch 16 --precision bf16
  step "torch small f32 eager" 90 torch_ref "${small[@]}" --batch 16
  step "torch small bf16 compiled" 150 torch_ref "${small[@]}" --batch 16 --precision bf16 --compile
  step "torch smollm2-135m bf16 eager" 90 torch_ref "${smollm2[@]}" --steps 6 --warmup 2 --batch 8 --precision bf16
  step "torch qwen2.5-0.5b bf16 eager" 90 torch_ref "${qwen25[@]}" --steps 6 --warmup 2 --batch 4 --precision bf16
fi
# burn's autotune choices, to carry to the next call (see the top).
[ -d target/autotune ] && tar -czf "$out/autotune.tgz" -C target autotune
