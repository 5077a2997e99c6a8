"""Where the time of a run goes: runs `lite auto_gptq`, `lite auto_awq` or `lite smooth_quant` in this process
on a random Llama-shaped checkpoint (scripts/bench_pipeline.py's) and prints the seconds spent in each of
the functions below (CUDA synchronized around each call, so the sum is not the wall time of an
overlapped run).

    python scripts/profile_steps.py --command auto_gptq --layers 2      # Llama-3-8B-shaped blocks on cuda
    python scripts/profile_steps.py --command smooth_quant --layers 32 --format compressed-tensors \
        --act-scheme static                                             # W8A8, static activation scales
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
    p.add_argument("--command", default="auto_gptq", choices=["auto_gptq", "auto_awq", "smooth_quant"])
    p.add_argument("--format", default=None, help="--format of the command (default: the command's own)")
    p.add_argument("--act-scheme", default=None, help="smooth_quant's --act-scheme (dynamic or static)")
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
    import lite.calibrate as calibrate
    import lite.steps.readback as readback
    import lite.steps.smoothquant as smoothquant
    import lite.steps.static_scales as static_scales
    import lite.steps.stats as stats
    import lite.stream as stream
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
    timed(stats.Statistics, "apply_", "step statistics.apply_")
    timed(calibrate.RunningStats, "update", "observer RunningStats.update (statistics)")
    timed(smoothquant.SmoothQuant, "apply_", "step smoothquant.apply_")
    timed(static_scales.StaticScales, "apply_", "step static_scales.apply_")
    timed(observers.MinMax, "update", "observer MinMax.update (static scales)")
    timed(readback.ReadbackRecord, "apply_", "step readback record.apply_")
    timed(stream, "check_streamed_readback", "read-back check (after the sweep)")

    shutil.rmtree(args.root, ignore_errors=True)
    model, work = os.path.join(args.root, "model"), os.path.join(args.root, "work")
    make_checkpoint(args, model)
    start = time.perf_counter()
    lite([args.command, model, "--work-dir", work, "--calib-dataset", "random", "--calib-samples", str(args.samples),
          "--calib-seqlen", str(args.seqlen), "--device", args.device, "--verbose",
          *(["--format", args.format] if args.format else []),
          *(["--act-scheme", args.act_scheme] if args.act_scheme else [])])
    print(f"{args.command}: {time.perf_counter() - start:.1f} s for {args.layers} layers")
    for label, seconds in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"{seconds:8.2f} s  {CALLS[label]:6d} calls  {label}")
    shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
