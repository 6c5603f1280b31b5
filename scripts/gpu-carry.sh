#!/usr/bin/env bash
# Builds, on the CPU machine, what a lent GPU machine runs: pipe and the GPU suite
# (tests/cuda.rs) with --features cuda, stripped and gzipped into target/gpu-carry/ (small enough
# to carry). On the GPU machine, from the repository root:
#   gunzip -f target/gpu-carry/*.gz && chmod +x target/gpu-carry/* &&
#   GPU_PIPE_BIN=target/gpu-carry/pipe GPU_SUITE_BIN=target/gpu-carry/cuda-suite scripts/gpu-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-carry
rm -rf "$out" && mkdir -p "$out"
cargo build --release --features cuda
# Before the test build, which rebuilds target/release/pipe with the tests' features.
strip -o "$out/pipe" target/release/pipe
suite=$(cargo test --release --features cuda --test cuda --no-run --message-format=json \
  | python3 -c "import json,sys; print(*[m['executable'] for m in map(json.loads, sys.stdin) \
      if m.get('executable') and m['target']['kind'] == ['test'] and m['target']['name'] == 'cuda'])")
strip -o "$out/cuda-suite" "$suite"
gzip -6 "$out/pipe" "$out/cuda-suite"
ls -l "$out"
