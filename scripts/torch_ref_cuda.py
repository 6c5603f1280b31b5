"""Runs the project's PyTorch speed reference (torch_ref.py, a CPU script) on a CUDA GPU.

usage: python3 scripts/torch_ref_cuda.py PATH/TO/torch_ref.py [its arguments]

The reference is run unchanged but for three things, so that its figures are a GPU's:
- tensors are made on the GPU (`torch.set_default_device("cuda")`);
- its autocast asks for the GPU's (`torch.autocast("cpu", …)` there would leave every CUDA
  product in f32);
- every clock read waits for the GPU first, so that a step's time is the GPU's work and not
  the time it took to queue it.
f32 products run as TF32, as burn's do on the same card; the printed `impl` says so.
"""
import sys
import time

import torch

path, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
torch.set_default_device("cuda")
torch.set_float32_matmul_precision("high")
clock = time.perf_counter


def synchronized_clock():
    torch.cuda.synchronize()
    return clock()


time.perf_counter = synchronized_clock
source = open(path).read().replace('torch.autocast("cpu"', 'torch.autocast("cuda"')
source = source.replace('f"pytorch {torch.__version__} {mode}"',
                        'f"pytorch {torch.__version__} {mode} cuda {torch.cuda.get_device_name()} tf32"')
exec(compile(source, path, "exec"), {"__name__": "__main__"})
