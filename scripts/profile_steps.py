"""Where the time of a weight-only run goes: runs `lite auto_gptq` or `lite auto_awq` in this process on a
random Llama-shaped checkpoint (scripts/bench_pipeline.py's) and prints the seconds spent in each of the
functions below (CUDA synchronized around each call, so the sum is not the wall time of an overlapped run).

    python scripts/profile_steps.py --command auto_gptq --layers 2      # Llama-3-8B-shaped blocks on cuda
"""

import argparse
import collections
import functools
import os
import shutil
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

SPENT = collections.defaultdict(float)
CALLS = collections.Counter()


def timed(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            SPENT[label] += time.perf_counter() - start
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def main():
    from bench_pipeline import add_shape_arguments, make_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--command", default="auto_gptq", choices=["auto_gptq", "auto_awq"])
    add_shape_arguments(p, layers=2)
    p.add_argument("--root", default="/tmp/lite-profile")
    args = p.parse_args()

    import lite.gptq as gptq
    import lite.observers as observers
    import lite.kernels as kernels
    import lite.qmodules as qmodules
    import lite.steps.awq as awq
    import lite.steps.gptq as gptq_step
    import lite.steps.rtn as rtn
    import lite.sweep as sweep
    from lite.cli.main import main as lite

    timed(gptq_step, "gptq_quantize", "gptq: gptq_quantize (all of it)")
    timed(gptq, "_qparams", "gptq:   group parameters (clip search)")
    timed(gptq, "inverse_hessian_factor", "gptq:   Cholesky factor of H^-1")
    timed(gptq, "gptq_columns", "gptq:   column loop (Triton)")
    timed(gptq, "columns_reference", "gptq:   column loop (PyTorch)")
    timed(qmodules.WQLinear, "from_codes", "pack into WQLinear")
    timed(gptq_step.Gptq, "apply_", "step gptq.apply_")
    timed(observers.Hessian, "update", "observer Hessian.update (gptq, awq, rtn)")
    timed(awq.Awq, "apply_", "step awq.apply_")
    timed(awq.Awq, "_search", "awq:   _search")
    timed(awq, "_fake_quantize", "awq:     fake quantize (clip search)")
    timed(awq.Calls, "update_call", "observer Calls.update_call")
    timed(rtn.Rtn, "apply_", "step rtn.apply_")
    timed(rtn, "quantize_rtn", "rtn:   quantize_rtn")
    timed(kernels, "clip_search", "clip search kernel (anywhere)")

    shutil.rmtree(args.root, ignore_errors=True)
    model, work = os.path.join(args.root, "model"), os.path.join(args.root, "work")
    make_checkpoint(args, model)
    start = time.perf_counter()
    lite([args.command, model, "--work-dir", work, "--calib-dataset", "random", "--calib-samples", str(args.samples),
          "--calib-seqlen", str(args.seqlen), "--device", args.device, "--verbose"])
    print(f"{args.command}: {time.perf_counter() - start:.1f} s for {args.layers} layers")
    for label, seconds in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"{seconds:8.2f} s  {CALLS[label]:6d} calls  {label}")
    shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
