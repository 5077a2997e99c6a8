"""Time `--alpha auto` against calibration alone on one model (CPU or GPU).

    python scripts/bench_alpha_search.py ../shared/models/stories260K-hf --calib-text ../shared/text/tinystories-train.txt \\
        --quant-dtype fp8 --device cpu

MODEL `random` builds a random bf16 Llama of the shape given by --hidden, --intermediate, --layers,
--heads, --kv-heads and --vocab (Llama-3-8B's by default, 4 layers) fed random token ids: the search
costs the same whatever the weights. For L layers it runs 21 · L candidate blocks and
21 · L(L - 1)/2 float block passes, which is how two depths extrapolate to a whole model.
"""

import argparse
import time

import torch

from lite.steps.stats import collect_statistics
from lite.data import calibration_tokens
from lite.model import LoadedModel, load_model
from lite.steps.alpha_search import search_alphas


def random_llama(args) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=max(8192, args.calib_seqlen))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return LoadedModel(model, None, "random", None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--calib-text", default="sample")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--quant-dtype", default="fp8")
    p.add_argument("--w-stat", default="lmdeploy")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for flag, default in (("hidden", 4096), ("intermediate", 14336), ("layers", 4), ("heads", 32), ("kv-heads", 8),
                          ("vocab", 128256)):
        p.add_argument(f"--{flag}", type=int, default=default, help="shape of MODEL random")
    args = p.parse_args()

    if args.model == "random":
        loaded = random_llama(args)
        tokens = torch.randint(0, args.vocab, (args.calib_samples, args.calib_seqlen),
                               generator=torch.Generator().manual_seed(0))
    else:
        loaded = load_model(args.model)
        tokens = calibration_tokens(loaded.tokenizer, args.calib_text, args.calib_samples, args.calib_seqlen, 0)
    start = time.perf_counter()
    inputs, _ = collect_statistics(loaded.model, loaded.arch, tokens, args.batch_size, args.device, progress=False)
    calibration = time.perf_counter() - start
    start = time.perf_counter()
    _, chosen = search_alphas(loaded.model, loaded.arch, inputs["absmax"], args.w_stat, args.quant_dtype, tokens,
                              args.batch_size, args.device, progress=False)
    search = time.perf_counter() - start
    if args.device == "cuda":
        print(f"peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"{len(chosen)} blocks, {tokens.numel()} calibration tokens on {args.device}: "
          f"calibration {calibration:.1f} s, alpha search {search:.1f} s")
    print("chosen: " + ", ".join(f"{prefix}: {alpha}" for prefix, alpha in chosen.items()))


if __name__ == "__main__":
    main()
