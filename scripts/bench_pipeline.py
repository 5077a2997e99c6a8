"""Benchmark `lite smooth_quant` (or `auto_gptq`, `auto_awq`) on a random-weight Llama checkpoint, next to two
floors measured in the same run.

    python scripts/bench_pipeline.py                       # Llama-3-8B shape, 128 x 2048 random tokens, cuda
    python scripts/bench_pipeline.py --command auto_gptq   # W4A16 GPTQ, groups of 128, compressed-tensors
    python scripts/bench_pipeline.py --layers 4 --hidden 8192 --intermediate 28672 --heads 64   # 70B-shaped slice
    python scripts/bench_pipeline.py --experts 128 --top-k 8 --moe-intermediate 768 --hidden 2048 --heads 32 \
        --kv-heads 4 --head-dim 128 --vocab 151936 --layers 8 --no-floors   # Qwen3-30B-A3B-shaped slice (qwen3_moe)
    python scripts/bench_pipeline.py --family gpt_oss --experts 32 --top-k 4 --moe-intermediate 2880 --hidden 2880 \
        --heads 64 --kv-heads 8 --head-dim 64 --vocab 201088 --layers 8 --no-floors   # gpt-oss-20b-shaped slice
    python scripts/bench_pipeline.py --device cpu --hidden 2048 --intermediate 5632 --heads 16 --kv-heads 4 \\
        --vocab 32000 --layers 8 --samples 8 --seqlen 512  # ~1 GB bf16 model on the CPU

Prints: the time of each stage of the streamed run (from the `timings` line lite prints), the whole
command from process start to a complete output folder, the same minus the time a process takes to
import torch, transformers and lite, peak RSS of the lite process (and of a process that only does
those imports), peak GPU memory reserved, and the floors: reading the checkpoint once (the first read
is cold only with --drop-caches, which needs root) and one bf16 forward of the model over the
calibration tokens, block by block, with the same batch size.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Each child prints its own peak RSS (VmHWM) at exit: the rusage of a child counts the memory of the
# forked parent before exec, which would inflate both numbers by whatever this script holds.
HWM = ("import atexit; atexit.register(lambda: print('VmHWM_kB', "
       "open('/proc/self/status').read().split('VmHWM:')[1].split()[0]))")
# Everything the run imports, lazily loaded transformers modules included; the lite child times these
# imports itself (same page-cache state as its run) and prints `imports_s`.
IMPORTS = ("import torch, transformers; import lite.pipeline, lite.stream; from cli.main import main; "
           "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast; "
           "import transformers.models.llama.modeling_llama")
CLI = (HWM + "; import sys, time; _t = time.perf_counter(); " + IMPORTS +
       "; print('imports_s', time.perf_counter() - _t); main(sys.argv[1:])")
IMPORTS = HWM + "; " + IMPORTS


def llama_config(args):
    """The checkpoint's config: Llama, or with --experts a Qwen3-MoE whose every layer is sparse, or with
    --family gpt_oss a gpt-oss (experts stored fused, sliding and full layers in turn)."""
    from transformers import GptOssConfig, LlamaConfig, Qwen3MoeConfig

    if args.family == "gpt_oss":
        return GptOssConfig(hidden_size=args.hidden, intermediate_size=args.moe_intermediate,
                            num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, head_dim=args.head_dim or args.hidden // args.heads,
                            vocab_size=args.vocab, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257,
                            dtype="bfloat16")
    if args.experts:
        return Qwen3MoeConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                              moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
                              num_experts_per_tok=args.top_k, norm_topk_prob=True, decoder_sparse_step=1,
                              mlp_only_layers=[], num_hidden_layers=args.layers, num_attention_heads=args.heads,
                              num_key_value_heads=args.kv_heads, head_dim=args.head_dim or args.hidden // args.heads,
                              vocab_size=args.vocab, max_position_embeddings=max(8192, args.seqlen),
                              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=256,
                              eos_token_id=257, dtype="bfloat16")
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=max(8192, args.seqlen), rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, dtype="bfloat16")


def block_tensors(config, i, gen_device, generator):
    """Random bf16 weights of decoder block i: linears N(0, 0.02), norms U(0.5, 1.5); for a MoE config,
    one gate/up/down per expert under the checkpoint's names, a router and Qwen3's q/k norms."""
    h, inter = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q)}
    experts = getattr(config, "num_experts", 0) or 0
    if experts and config.model_type == "qwen3_moe":
        moe = config.moe_intermediate_size
        for e in range(experts):
            shapes.update({f"mlp.experts.{e}.gate_proj": (moe, h), f"mlp.experts.{e}.up_proj": (moe, h),
                           f"mlp.experts.{e}.down_proj": (h, moe)})
        shapes["mlp.gate"] = (experts, h)
    else:
        shapes.update({"mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)})
    out = {}
    if config.model_type == "gpt_oss":  # fused on disk: (E, H, 2I) interleaved gate/up, (E, I, H); biases; sinks
        moe, o = config.intermediate_size, config.num_local_experts
        shapes = {k: v for k, v in shapes.items() if k.startswith("self_attn.")}
        shapes.update({"mlp.router": (o, h)})
        fused = {"mlp.experts.gate_up_proj": (o, h, 2 * moe), "mlp.experts.down_proj": (o, moe, h)}
        biases = {"mlp.experts.gate_up_proj_bias": (o, 2 * moe), "mlp.experts.down_proj_bias": (o, h),
                  "mlp.router.bias": (o,), "self_attn.sinks": (config.num_attention_heads,),
                  **{f"self_attn.{n}.bias": (shapes[f"self_attn.{n}"][0],) for n in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")}}
        for name, shape in {**fused, **biases}.items():
            t = torch.empty(shape, device=gen_device, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
            out[f"model.layers.{i}.{name}"] = t.cpu()
    for name, shape in shapes.items():
        w = torch.empty(shape, device=gen_device, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        out[f"model.layers.{i}.{name}.weight"] = w.cpu()
    norms = {"input_layernorm": h, "post_attention_layernorm": h}
    if experts and config.model_type == "qwen3_moe":
        norms.update({"self_attn.q_norm": hd, "self_attn.k_norm": hd})
    for name, width in norms.items():
        w = torch.empty(width, device=gen_device, dtype=torch.bfloat16).uniform_(0.5, 1.5, generator=generator)
        out[f"model.layers.{i}.{name}.weight"] = w.cpu()
    return out


def make_checkpoint(args, folder):
    """config.json, a byte tokenizer and one safetensors shard per block (embeddings and head in their own)."""
    from safetensors.torch import save_file

    from lite.model import byte_tokenizer

    config = llama_config(args)
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(gen_device).manual_seed(0)
    shards = [lambda: {"model.embed_tokens.weight": torch.empty(args.vocab, args.hidden, device=gen_device,
                                                                dtype=torch.bfloat16).normal_(0, 1, generator=g).cpu()}]
    shards += [lambda i=i: block_tensors(config, i, gen_device, g) for i in range(args.layers)]
    shards += [lambda: {"model.norm.weight": torch.ones(args.hidden, dtype=torch.bfloat16),
                        "lm_head.weight": torch.empty(args.vocab, args.hidden, device=gen_device,
                                                      dtype=torch.bfloat16).normal_(0, 0.02, generator=g).cpu()}]
    weight_map, total = {}, 0
    for k, make in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_floor(folder) -> float:
    """Seconds to read every shard once into memory, 256 MiB at a time."""
    buf = bytearray(256 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb", buffering=0) as f:
                while f.readinto(view):
                    pass
    return time.perf_counter() - start


@torch.no_grad()
def forward_floor(args, batch_size, device) -> float:
    """Seconds of one bf16 forward over samples x seqlen tokens through `layers` blocks (one block's random
    weights reused for each), the hidden states kept in place, as lite's runner does."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = llama_config(args)
    config._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(config, 0).to(device, torch.bfloat16).eval()
    rotary = LlamaRotaryEmbedding(config).to(device)
    hidden = [torch.randn(min(batch_size, args.samples - s), args.seqlen, args.hidden, device=device,
                          dtype=torch.bfloat16) for s in range(0, args.samples, batch_size)]
    position_ids = torch.arange(args.seqlen, device=device)[None]
    pe = rotary(hidden[0], position_ids)
    block(hidden[0][:1], position_embeddings=pe, attention_mask=None)  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.layers):
        for j, h in enumerate(hidden):
            out = block(h, position_embeddings=pe, attention_mask=None)
            hidden[j] = out[0] if isinstance(out, tuple) else out
    sync()
    return time.perf_counter() - start


def run_child(argv) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, output) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                 "TQDM_DISABLE": "1"})
    output = proc.stdout.read()
    _, status = os.waitpid(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        print(output)
        raise SystemExit(f"child failed with status {status}: {' '.join(argv)}")
    hwm = [line.split()[1] for line in output.splitlines() if line.startswith("VmHWM_kB ")]
    return wall, int(hwm[-1]) / 2**20, output


def add_shape_arguments(p: argparse.ArgumentParser, layers: int = 32) -> None:
    """The checkpoint's shape (Llama-3-8B by default) and the calibration tokens, for this script and
    scripts/profile_steps.py."""
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    p.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE with this many experts per layer")
    p.add_argument("--top-k", type=int, default=8, help="experts per token (with --experts)")
    p.add_argument("--moe-intermediate", type=int, default=768, help="each expert's width (with --experts)")
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "gpt_oss"],
                   help="the MoE family of the checkpoint (with --experts; gpt_oss stores its experts fused)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--max-gpu-memory", default="8GiB")
    p.add_argument("--command", default="smooth_quant", choices=["smooth_quant", "auto_gptq", "auto_awq"],
                   help="the lite command to time (weight-only: W4A16 groups of 128, the command's defaults)")
    p.add_argument("--format", default=None, help="--format of the command (default: the command's own)")
    p.add_argument("--act-scheme", default="dynamic", help="dynamic or static (compressed-tensors)")
    p.add_argument("--act-observer", default="minmax")
    p.add_argument("--root", default="/tmp/lite-bench", help="folder for the checkpoint, work dir and output")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each read (root only)")
    p.add_argument("--no-floors", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and output")
    args = p.parse_args()

    model, work = os.path.join(args.root, "model"), os.path.join(args.root, "work")
    shutil.rmtree(args.root, ignore_errors=True)
    start = time.perf_counter()
    size = make_checkpoint(args, model)
    shape = (f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads, "
             f"{args.kv_heads} KV heads, vocab {args.vocab}, bf16")
    if args.experts:
        shape = (f"{args.family}: {args.experts} experts of intermediate {args.moe_intermediate}, top-{args.top_k}, "
                 f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads of {args.head_dim}, "
                 f"{args.kv_heads} KV heads, vocab {args.vocab}, bf16")
    print(f"checkpoint: {shape}: {size / 1e9:.2f} GB written in {time.perf_counter() - start:.1f} s")

    _, import_rss, _ = run_child([sys.executable, "-c", IMPORTS])
    cold = drop_caches() if args.drop_caches else False
    argv = [sys.executable, "-c", CLI, args.command, model, "--work-dir", work, "--calib-dataset", "random",
            "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen), "--device", args.device,
            "--batch-size", str(args.batch_size), "--max-gpu-memory", args.max_gpu_memory, "--verbose"]
    if args.format is not None:
        argv += ["--format", args.format]
    if args.command == "smooth_quant":
        argv += ["--act-scheme", args.act_scheme, "--act-observer", args.act_observer]
    wall, rss, output = run_child(argv)
    timings = [line for line in output.splitlines() if line.startswith("timings ")][-1]  # static: two passes
    import_wall = float(next(line for line in output.splitlines() if line.startswith("imports_s ")).split()[1])
    stages = dict(item.split("=") for item in timings.split()[1:])
    out_dir = os.path.join(work, "quantized")
    out_size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))

    floors = {}
    if not args.no_floors:
        if args.drop_caches:
            drop_caches()
        floors["read_checkpoint_s"] = read_floor(model)
        bs = int(stages["batch_size"])
        floors["bf16_forward_s"] = forward_floor(args, bs, args.device)
        if args.device == "cuda":
            floors["forward_peak_gpu_gib"] = torch.cuda.max_memory_reserved() / 2**30

    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; "
          f"tokens: {args.samples} x {args.seqlen} random; page cache dropped before lite: {cold}")
    print(f"lite stages (s): {timings[len('timings '):]}")
    print(f"{args.command}, process start to complete output folder: {wall:.1f} s")
    print(f"  minus imports ({import_wall:.1f} s, timed inside the lite process): {wall - import_wall:.1f} s")
    print(f"peak RSS: {rss:.2f} GiB (import-only process: {import_rss:.2f} GiB; above it: {rss - import_rss:.2f} GiB "
          f"= {(rss - import_rss) * 2**30 / size * 100:.0f} % of the {size / 1e9:.2f} GB checkpoint)")
    if "peak_gpu_reserved_gib" in stages:
        print(f"peak GPU memory reserved: {stages['peak_gpu_reserved_gib']} GiB")
    print(f"output: {out_size / 1e9:.2f} GB")
    for k, v in floors.items():
        print(f"floor {k}: {v:.2f}")
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
