#!/usr/bin/env bash
# pipe bench against the PyTorch reference (scripts/torch_ref.py), same machine, same
# sitting, alternating the two so that drift on a shared machine hits both alike: PyTorch eager
# f32, compiled f32 and bf16 autocast beside pipe f32 and bf16, one JSON line each.
#   PYTHON=/path/to/python-with-torch-and-transformers scripts/cpu-bench.sh [rounds]
# PIPE_BEFORE=/path/to/an/older/pipe runs that binary's bench beside this one's (before/after).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_REF=${TORCH_REF:-scripts/torch_ref.py}
ROUNDS=${1:-2}
cargo build --release --quiet
tiny="--layers 4 --heads 4 --embd 256 --vocab 8192 --seq 128 --batch 8"
small="--layers 12 --heads 12 --embd 768 --vocab 50257 --seq 256 --batch 4 --steps 4 --warmup 1"
for shape in "$tiny" "$small"; do
  for _ in $(seq "$ROUNDS"); do
    for torch in "" "--compile" "--precision bf16"; do
      # shellcheck disable=SC2086
      "$PYTHON" "$TORCH_REF" $shape --threads 2 $torch
    done
    for precision in f32 bf16; do
      # shellcheck disable=SC2086
      ./target/release/pipe bench $shape --precision $precision
      if [ -n "${PIPE_BEFORE:-}" ]; then
        # shellcheck disable=SC2086
        "$PIPE_BEFORE" bench $shape --precision $precision
      fi
    done
  done
done
