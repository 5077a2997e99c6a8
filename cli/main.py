"""The `lite` command: wires the stage functions of `lite.pipeline` to the command line.

Each function below is a command; its parameters are the flags (kebab-case on the command line), its
annotations say how values are read and its docstring is the `--help` text (cli/flags.py). `--recipe
FILE` is expanded into flags before parsing (lite/recipes.py); the `recipe` parameters exist so that
`--help` lists it.
"""

import errno
import os
import signal
import sys

from lite import __version__, folders, pipeline
from .flags import parse, render_help
from lite.errors import LiteError
from lite.observers import ActSettings
from lite.settings import CalibSettings, SmoothSettings
from lite.recipes import expand_recipe

# The defaults the flags show come from the settings dataclasses, not repeated here.
CALIB, SMOOTH, ACT = CalibSettings(), SmoothSettings(), ActSettings()


def given_calib(calib_dataset, calib_samples, calib_seqlen, seed, moe_calibrate_all_experts=None) -> dict:
    """The calibration flags given (None where not): checked now, completed from the work dir's record later."""
    given = dict(calib_dataset=calib_dataset, calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed,
                 moe_calibrate_all_experts=moe_calibrate_all_experts)
    CalibSettings(**{k: v for k, v in given.items() if v is not None})  # refuses bad values before any work
    return given


def calibrate(model: str, work_dir: str = None, recipe: str = None, calib_dataset: str = CALIB.calib_dataset,
              calib_samples: int = CALIB.calib_samples, calib_seqlen: int = CALIB.calib_seqlen,
              batch_size: int | str = 4, seed: int = CALIB.seed, device: str = None, dtype: str = "auto",
              trust_remote_code: bool = False, moe_calibrate_all_experts: bool = CALIB.moe_calibrate_all_experts):
    """Collect per-channel activation statistics, one decoder block at a time (for a local safetensors
    folder, each block's weights are read from the shards when its turn comes, never the whole model).

    Writes WORK_DIR/inputs_stats.pth and WORK_DIR/outputs_stats.pth in lmdeploy's layout
    ({max,min,mean,absmax,absmean} -> {linear fqn -> fp32 tensor}) and records the settings in
    WORK_DIR/lite_manifest.json.

    Args:
        model: a local Hugging Face model folder, a hub id (org/name), or tiny:<model_type> for a small
            random model lite builds itself (tiny:llama, tiny:qwen2, ...).
        work_dir: folder for the artifacts; created if missing. Must not hold another model's files.
        recipe: a YAML file of flag values for the whole job (see configs/, e.g. configs/w8a8-int8.yaml);
            flags given on the command line win over it.
        calib_dataset: wikitext2, c4, pileval, ptb (downloaded with `datasets`), sample (text shipped
            with lite), or a local .txt, .jsonl (a "text" field per line) or .parquet (a "text" column) file.
        calib_samples: number of calibration sequences.
        calib_seqlen: tokens per calibration sequence (BOS included).
        batch_size: sequences per forward call.
        seed: seed for choosing the calibration windows.
        device: where each block runs: cuda (default when available) or cpu.
        dtype: auto (the checkpoint's), float32, float16 or bfloat16.
        trust_remote_code: allow model code from the hub (only for models you trust).
        moe_calibrate_all_experts: Mixture-of-Experts models: every expert's statistics see every
            calibration token, while each block's output keeps the model's own routing. With false, an expert sees only the tokens routed to it, and one that gets none is left
            unsmoothed, with a warning naming it.
    """
    calib = CalibSettings(calib_dataset, calib_samples, calib_seqlen, seed, moe_calibrate_all_experts)
    pipeline.calibrate(model, work_dir, calib, batch_size, device, dtype, trust_remote_code)


def smooth(model: str, work_dir: str = None, recipe: str = None, alpha: float | str = SMOOTH.alpha,
           w_stat: str = SMOOTH.w_stat, quant_dtype: str = SMOOTH.quant_dtype, calib_dataset: str = None,
           calib_samples: int = None, calib_seqlen: int = None, batch_size: int | str = 4, seed: int = None,
           device: str = None, dtype: str = "auto", trust_remote_code: bool = False,
           moe_calibrate_all_experts: bool = None):
    """Compute SmoothQuant migration scales s = max|X|^alpha / w^(1-alpha) for every smoothing pair.

    Reads WORK_DIR/inputs_stats.pth (calibrating first when it is missing or was made with other
    calibration settings) and writes WORK_DIR/migration_scales.pth = {consumer linear fqn -> s}.
    For a local safetensors folder only one block's weights are in memory at a time.
    Pairs: each block's norms -> the linears they feed, v_proj -> o_proj (one factor per KV channel
    under grouped-query attention) and up_proj -> down_proj.

    Args:
        model: a local model folder, a hub id, or tiny:<model_type>.
        work_dir: folder of the artifacts.
        recipe: a YAML file of flag values for the whole job (see configs/, e.g. configs/w8a8-int8.yaml);
            flags given on the command line win over it.
        alpha: migration strength in [0, 1]: the larger, the more of the activations' outlier range
            moves into the weights. Default 0.3, chosen by measurement (README, "Choosing the defaults").
            Or auto, to choose it per decoder block, from 0, 0.05, ..., 1, by the next-token loss of the
            quantized model (--quant-dtype) on the calibration windows; slower, and loads the whole
            model (README, "--alpha auto"). Recommended for fp8.
        w_stat: weight statistic w: lmdeploy (mean over rows of |W| / row max, then s normalized by
            sqrt(max(s)·min(s)); the default, best on our measurements) or absmax (the paper's column max).
        quant_dtype: int8 or fp8: what --alpha auto quantizes its candidates to (use the dtype you will
            export); fixed alphas do not depend on it.
        calib_dataset: see `lite calibrate --help`; used only when statistics must be (re)made. Default: what
            WORK_DIR's statistics were made with (said in one line), else wikitext2; likewise for the next three.
        calib_samples: see `lite calibrate --help` (default: as recorded, else 128).
        calib_seqlen: see `lite calibrate --help` (default: as recorded, else 2048).
        batch_size: see `lite calibrate --help`.
        seed: see `lite calibrate --help` (default: as recorded, else 0).
        device: cuda (default when available) or cpu.
        dtype: auto, float32, float16 or bfloat16.
        trust_remote_code: allow model code from the hub.
        moe_calibrate_all_experts: see `lite calibrate --help` (default: as recorded, else true).
    """
    calib = given_calib(calib_dataset, calib_samples, calib_seqlen, seed, moe_calibrate_all_experts)
    pipeline.smooth(model, work_dir, calib, SmoothSettings(alpha, w_stat, quant_dtype), batch_size, device, dtype,
                    trust_remote_code)


def export(model: str, work_dir: str = None, recipe: str = None, quant_dtype: str = "int8",
           export_migration_scale: bool = False, max_shard_size: str = "5GB", out_dir: str = None, dtype: str = "auto",
           trust_remote_code: bool = False, format: str = "lmdeploy", act_scheme: str = ACT.act_scheme,
           act_observer: str = ACT.act_observer, act_percentile: float = ACT.act_percentile, no_smooth: bool = False,
           batch_size: int | str = 4, device: str = None):
    """Quantize to W8A8 and write an lmdeploy smooth_quant or a compressed-tensors checkpoint.

    Applies WORK_DIR/migration_scales.pth when present (unless --no-smooth), swaps every linear inside
    the decoder blocks for a QLinear (weights per output channel; activations per token at run time,
    or per tensor with calibrated static scales) and writes sharded safetensors, config.json with
    quantization_config and the tokenizer files. lmdeploy format also turns the norms feeding the
    linears into QRMSNorm; compressed-tensors keeps them plain with the smoothing folded in. The
    folder appears only when complete. For a local safetensors folder or a hub id (downloaded first),
    the model is never loaded whole: each block is read from the shards, quantized and written to
    the output shards in turn (static scales: the calibration windows run through each smoothed
    block first). A model loaded whole (tiny:) is read back and its logits compared instead.

    Args:
        model: a local model folder, a hub id, or tiny:<model_type>.
        work_dir: folder of the artifacts.
        recipe: a YAML file of flag values for the whole job (see configs/, e.g. configs/w8a8-int8.yaml);
            flags given on the command line win over it.
        quant_dtype: int8 or fp8 (float8 e4m3).
        export_migration_scale: leave norms and producers untouched and store the SmoothQuant factor on
            every QLinear as migration_scale (ones where not smoothed), for engines that cannot fold it.
        max_shard_size: largest safetensors shard, e.g. 5GB or 500MB; an index file is written when
            there is more than one.
        out_dir: where the checkpoint goes (default WORK_DIR/quantized).
        dtype: auto, float32, float16 or bfloat16 (embeddings, norms and lm_head keep it).
        trust_remote_code: allow model code from the hub.
        format: lmdeploy (lmdeploy's smooth_quant layout, the default) or compressed-tensors
            (int-quantized / float-quantized, read by vLLM, SGLang and transformers).
        act_scheme: dynamic (per-token scales at run time, the default) or static (one calibrated
            input_scale per linear; compressed-tensors only). Static reuses the calibration settings
            recorded for WORK_DIR's statistics, so run `lite calibrate` first.
        act_observer: how static scales pick their range: minmax (max |x| over all calibration
            tokens, the default), percentile (see --act-percentile) or mse (the clip range minimizing
            the quantization error). Linears reading the same input (q/k/v, gate/up) share one scale.
        act_percentile: the percentile of |x| used by --act-observer percentile, e.g. 99.99.
        no_smooth: ignore WORK_DIR/migration_scales.pth and quantize the unsmoothed model.
        batch_size: sequences per forward call of the static-scale calibration pass.
        device: where the static-scale calibration pass runs: cuda (default when available) or cpu.
    """
    pipeline.export(model, work_dir, quant_dtype, export_migration_scale, max_shard_size, out_dir, dtype,
                    trust_remote_code, format, ActSettings(act_scheme, act_observer, act_percentile), no_smooth,
                    batch_size, device)


def smooth_quant(model: str, work_dir: str = None, recipe: str = None, quant_dtype: str = "int8",
                 export_migration_scale: bool = False, alpha: float | str = SMOOTH.alpha, w_stat: str = SMOOTH.w_stat,
                 calib_dataset: str = None, calib_samples: int = None, calib_seqlen: int = None,
                 batch_size: int | str = "auto", seed: int = None, max_shard_size: str = "5GB", out_dir: str = None,
                 device: str = None, dtype: str = "auto", trust_remote_code: bool = False, format: str = "lmdeploy",
                 act_scheme: str = ACT.act_scheme, act_observer: str = ACT.act_observer,
                 act_percentile: float = ACT.act_percentile, no_smooth: bool = False, max_gpu_memory: str = "8GiB",
                 moe_calibrate_all_experts: bool = None):
    """Calibrate, smooth and export in one command, reusing artifacts in WORK_DIR made with the same settings.

    For a local folder of safetensors (or a hub id, downloaded first) with no statistics or scales in
    WORK_DIR yet, all three run in one pass over the decoder blocks, streamed from the shards: memory
    for one or two blocks and the calibration activations, not for the model. --alpha auto loads the
    whole model (on --device for the search) and refuses one that does not fit.

    With --act-scheme static the smoothed model is run over the calibration windows once more to
    calibrate one input scale per linear, so the scales describe the inputs the linears will see.

    Args:
        model: a local model folder, a hub id, or tiny:<model_type>.
        work_dir: folder of the artifacts and (by default) of the checkpoint, WORK_DIR/quantized.
        recipe: a YAML file of flag values for the whole job (see configs/, e.g. configs/w8a8-int8.yaml);
            flags given on the command line win over it.
        quant_dtype: int8 or fp8.
        export_migration_scale: store the factors on the QLinears instead of folding them (see `lite export --help`).
        alpha: migration strength in [0, 1], or auto: chosen per decoder block by the loss of the model
            quantized to --quant-dtype on the calibration windows (see `lite smooth --help`).
        w_stat: lmdeploy (default) or absmax.
        calib_dataset: wikitext2, c4, pileval, ptb, sample, or a .txt/.jsonl/.parquet file. Default: what
            WORK_DIR's statistics were made with (said in one line), else wikitext2; likewise for the next three.
        calib_samples: number of calibration sequences (default: as recorded, else 128).
        calib_seqlen: tokens per calibration sequence, at most the model's max_position_embeddings (default: as
            recorded, else 2048).
        batch_size: sequences per forward call, or auto: as many as --max-gpu-memory allows when
            streaming (4 otherwise).
        seed: seed for choosing the calibration windows (default: as recorded, else 0).
        max_shard_size: largest safetensors shard, e.g. 5GB.
        out_dir: where the checkpoint goes (default WORK_DIR/quantized).
        device: cuda (default when available) or cpu.
        dtype: auto, float32, float16 or bfloat16.
        trust_remote_code: allow model code from the hub.
        max_gpu_memory: device memory the streamed run plans for, e.g. 8GiB: block weights, cached
            calibration activations (kept in pinned CPU memory when they do not fit) and the batch.
        format: lmdeploy (default) or compressed-tensors (see `lite export --help`).
        act_scheme: dynamic (per token, default) or static (per tensor, compressed-tensors only).
        act_observer: minmax (default), percentile or mse; see `lite export --help`.
        act_percentile: the percentile of |x| for --act-observer percentile, e.g. 99.99.
        no_smooth: skip SmoothQuant altogether (no statistics, no migration scales); --alpha 0 is not
            the same: at alpha 0, s = 1 / w still rescales every channel by its weight statistic.
        moe_calibrate_all_experts: see `lite calibrate --help` (default: as recorded, else true).
    """
    calib = given_calib(calib_dataset, calib_samples, calib_seqlen, seed, moe_calibrate_all_experts)
    pipeline.smooth_quant(model, work_dir, calib, SmoothSettings(alpha, w_stat, quant_dtype), quant_dtype,
                          export_migration_scale, max_shard_size, out_dir, batch_size, device, dtype,
                          trust_remote_code, format, ActSettings(act_scheme, act_observer, act_percentile),
                          no_smooth, max_gpu_memory)


def eval(*models: str, dataset: str = "wikitext2", seqlen: int = 512, max_windows: int = None, batch_size: int = 8,
         device: str = None, json_out: str = None):
    """Perplexity of float models and lite checkpoints side by side, and how close each one's next-token
    distribution stays to the first model's: the mean KL divergence from it (10^-3 nats per scored token)
    and the top-1 agreement with it, on the same windows. Name the float model first. Judge a
    quantized model by KL rather than perplexity: a quantization error that flattens the predictions
    can lower perplexity on a small model, never KL.

    Args:
        models: model folders, hub ids, tiny:<model_type> names, or folders lite exported.
        dataset: wikitext2, c4, ptb (their test splits), sample, or a .txt/.jsonl/.parquet file.
        seqlen: tokens per window, BOS included; every token after BOS is scored.
        max_windows: use at most this many windows, the first ones of the text (default: the whole text).
        batch_size: windows per forward call.
        device: cuda (default when available) or cpu.
        json_out: also write the table to this JSON file.
    """
    from lite.eval import evaluate

    evaluate(list(models), dataset, seqlen, max_windows, batch_size, device, json_out)


def run(recipe: str, model: str, work_dir: str = None, out_dir: str = None, calib_dataset: str = None,
        calib_samples: int = None, calib_seqlen: int = None, seed: int = None, batch_size: int | str = 4,
        max_shard_size: str = "5GB", device: str = None, dtype: str = "auto", trust_remote_code: bool = False,
        moe_calibrate_all_experts: bool = None):
    """Run a step recipe: model-preparation transforms, SmoothQuant, static scales, round-to-nearest,
    GPTQ and AWQ, in the order the recipe lists them, then write its format. A local safetensors
    folder streams block by block like `lite smooth_quant` (a hub id is downloaded first); recipes
    with transforms load the model in memory.

    A recipe is YAML with `data` (calib_dataset, calib_samples, calib_seqlen, seed,
    moe_calibrate_all_experts), `steps` (names from the step registry, each optionally with settings)
    and `format` (lmdeploy, compressed-tensors, awq or gptq); see configs/recipes/*.yaml and README, "Recipes". Steps: fuse_norms (fold each
    norm's weight into the linears it feeds), rotate (turn the residual stream by a randomized
    Hadamard matrix; after fuse_norms; setting seed), center_embeddings (refused on RMSNorm models
    unless force: true), smoothquant (alpha, w_stat), static_scales (act_observer, act_percentile;
    compressed-tensors only), rtn (quant_dtype, export_migration_scale; or weight-only with bits,
    group_size, symmetric, mse; last), gptq (bits, group_size, symmetric, damp, act_order, block_size,
    mse; or quant_dtype int8 after smoothquant: W8A8 with GPTQ rounding; last), awq (bits, group_size,
    symmetric, n_grid, max_tokens, clip; before a weight-only rtn or gptq). Weight-only formats:
    compressed-tensors, awq, gptq. Unknown keys are refused before any work.

    Args:
        recipe: the recipe file, e.g. configs/recipes/w8a8-int8-rotate-static.yaml.
        model: a local model folder, a hub id, or tiny:<model_type>.
        work_dir: folder for the statistics, scales, manifest and (by default) the checkpoint.
        out_dir: where the checkpoint goes (default WORK_DIR/quantized).
        calib_dataset: overrides the recipe's data; see `lite calibrate --help`.
        calib_samples: overrides the recipe's data.
        calib_seqlen: overrides the recipe's data.
        seed: overrides the recipe's data (the seed choosing calibration windows, not rotate's).
        batch_size: sequences per forward call.
        max_shard_size: largest safetensors shard, e.g. 5GB.
        device: cuda (default when available) or cpu.
        dtype: auto, float32, float16 or bfloat16 (transforms are exact in float32).
        trust_remote_code: allow model code from the hub.
        moe_calibrate_all_experts: overrides the recipe's data; see `lite calibrate --help`.
    """
    given = given_calib(calib_dataset, calib_samples, calib_seqlen, seed, moe_calibrate_all_experts)
    pipeline.run_recipe(recipe, model, work_dir, given, out_dir, max_shard_size, batch_size, device, dtype,
                        trust_remote_code)


def auto_gptq(model: str, work_dir: str = None, recipe: str = None, w_bits: int = 4, w_group_size: int = 128,
              w_sym: bool = True, w_channel_fallback: bool = False, act_order: bool = True, damp: float = 0.01,
              mse_clip: bool = True,
              format: str = "compressed-tensors", calib_dataset: str = CALIB.calib_dataset,
              calib_samples: int = CALIB.calib_samples, calib_seqlen: int = CALIB.calib_seqlen, seed: int = CALIB.seed,
              batch_size: int | str = "auto", max_shard_size: str = "5GB", out_dir: str = None, device: str = None,
              dtype: str = "auto", trust_remote_code: bool = False, max_gpu_memory: str = "8GiB",
              moe_calibrate_all_experts: bool = CALIB.moe_calibrate_all_experts):
    """Weight-only quantization with GPTQ (Frantar et al. 2022): each linear's weights rounded to
    --w-bits integers one input column at a time, each column's rounding error spread over the columns
    not yet rounded so that the linear's outputs on the calibration data move as little as possible.

    One pass over the decoder blocks, streamed from a local safetensors folder (a hub id is downloaded
    first): per block, the calibration activations run through it while the Hessians of its linears
    are summed (q/k/v share one, gate/up another), its linears are solved and swapped, and the block
    runs again so that the next one sees the quantized outputs. The checkpoint is written to
    WORK_DIR/quantized (or --out-dir) as the blocks finish; nothing else is kept in WORK_DIR but the
    manifest's record.

    Args:
        model: a local model folder, a hub id, or tiny:<model_type>.
        work_dir: folder for the manifest and (by default) the checkpoint.
        recipe: a YAML file of flag values for the whole job (see configs/w4a16-gptq.yaml); flags given on
            the command line win over it.
        w_bits: bits per weight, 2 to 8 (4: W4A16).
        w_group_size: input columns sharing one scale (and zero point), e.g. 128; -1: one per output channel.
            Must divide every linear's in_features.
        w_sym: true: symmetric codes, no zero points (what vLLM's Marlin kernels and lmdeploy take);
            false: a zero point per group (more accurate; vLLM falls back to a slower kernel for GPTQ).
        w_channel_fallback: linears whose in_features --w-group-size does not divide get one scale per
            output channel instead of being refused (compressed-tensors only: two config groups).
        act_order: quantize columns in order of decreasing activation energy (diag of the Hessian), with
            each group's scale fixed before the columns move ("static groups"), so the group map stays
            trivial and every engine loads it.
        damp: added to the Hessian diagonal, relative to its mean (0.01); raised tenfold, with a message,
            while the Hessian does not factorize.
        mse_clip: choose each group's clipping range (51 ratios from 0.5 to 1 of its full range) by the
            error it adds to the linear's output on the calibration data (default); false: the full range.
        format: compressed-tensors (pack-quantized; vLLM, SGLang, transformers; default), gptq (GPTQModel,
            vLLM, lmdeploy; gptq_v2 when asymmetric) or awq (4 bits, groups; lmdeploy TurboMind, vLLM).
            Each refuses, before any work, what its engines cannot load.
        calib_dataset: wikitext2, c4, pileval, ptb, sample, or a .txt/.jsonl/.parquet file.
        calib_samples: number of calibration sequences.
        calib_seqlen: tokens per calibration sequence, at most the model's max_position_embeddings.
        seed: seed for choosing the calibration windows.
        batch_size: sequences per forward call, or auto: as many as --max-gpu-memory allows when
            streaming (4 otherwise).
        max_shard_size: largest safetensors shard, e.g. 5GB.
        out_dir: where the checkpoint goes (default WORK_DIR/quantized).
        device: cuda (default when available) or cpu.
        dtype: auto, float32, float16 or bfloat16.
        trust_remote_code: allow model code from the hub.
        max_gpu_memory: device memory the streamed run plans for, e.g. 8GiB (see `lite smooth_quant --help`).
        moe_calibrate_all_experts: see `lite calibrate --help`.
    """
    calib = CalibSettings(calib_dataset, calib_samples, calib_seqlen, seed, moe_calibrate_all_experts)
    gptq = dict(bits=w_bits, group_size=w_group_size, symmetric=w_sym, channel_fallback=w_channel_fallback, damp=damp,
                act_order=act_order, mse=mse_clip)
    pipeline.quantize_weights(model, work_dir, [("gptq", gptq)], format, calib, out_dir, max_shard_size, batch_size,
                              device, dtype, trust_remote_code, max_gpu_memory)


def auto_awq(model: str, work_dir: str = None, recipe: str = None, w_bits: int = 4, w_group_size: int = 128,
             w_sym: bool = False, w_channel_fallback: bool = False, n_grid: int = 20, mse_clip: bool = True,
             format: str = "awq",
             calib_dataset: str = CALIB.calib_dataset, calib_samples: int = CALIB.calib_samples,
             calib_seqlen: int = CALIB.calib_seqlen, seed: int = CALIB.seed, batch_size: int | str = "auto",
             max_shard_size: str = "5GB", out_dir: str = None, device: str = None, dtype: str = "auto",
             trust_remote_code: bool = False, max_gpu_memory: str = "8GiB",
             moe_calibrate_all_experts: bool = CALIB.moe_calibrate_all_experts):
    """Weight-only quantization with AWQ (Lin et al. 2023): before rounding, each smoothing pair of a
    block (norm -> q/k/v, v -> o, norm -> gate/up, up -> down) is rescaled so that the input channels
    carrying large activations lose less to rounding; the float model is unchanged by the rescaling.
    The factor of each pair is searched on a grid by the output error of the attention, the MLP or the
    consumer linear on the calibration data with the weights quantized; then each group's clipping
    range is searched and the weights are rounded to nearest.

    One pass over the decoder blocks, streamed from a local safetensors folder (a hub id is downloaded
    first), each block written to WORK_DIR/quantized (or --out-dir) as it finishes.

    Args:
        model: a local model folder, a hub id, or tiny:<model_type>.
        work_dir: folder for the manifest and (by default) the checkpoint.
        recipe: a YAML file of flag values for the whole job (see configs/w4a16-awq.yaml); flags given on the
            command line win over it.
        w_bits: bits per weight, 2 to 8 (--format awq stores 4 only).
        w_group_size: input columns sharing one scale and zero point, e.g. 128; -1: one per output channel
            (not with --format awq). Must divide every linear's in_features.
        w_sym: false: a zero point per group, as AutoAWQ; true: symmetric codes.
        w_channel_fallback: linears whose in_features --w-group-size does not divide get one scale per
            output channel instead of being refused (compressed-tensors only: two config groups).
        n_grid: ratios tried per pair: 0, 1/n, ..., (n-1)/n (and no scaling at all).
        mse_clip: choose each group's clipping range by the error it adds to the linear's output on the
            calibration data (51 ratios from 0.5 to 1 of the full range; 6 from 0.75 while searching the scales)
            (default); false: the full range, as the paper.
        format: awq (AutoAWQ GEMM; lmdeploy TurboMind, vLLM, transformers; default), compressed-tensors
            (pack-quantized; vLLM, SGLang, transformers) or gptq. Each refuses, before any work, what its
            engines cannot load.
        calib_dataset: wikitext2, c4, pileval, ptb, sample, or a .txt/.jsonl/.parquet file.
        calib_samples: number of calibration sequences.
        calib_seqlen: tokens per calibration sequence, at most the model's max_position_embeddings.
        seed: seed for choosing the calibration windows.
        batch_size: sequences per forward call, or auto: as many as --max-gpu-memory allows when
            streaming (4 otherwise).
        max_shard_size: largest safetensors shard, e.g. 5GB.
        out_dir: where the checkpoint goes (default WORK_DIR/quantized).
        device: cuda (default when available) or cpu.
        dtype: auto, float32, float16 or bfloat16.
        trust_remote_code: allow model code from the hub.
        max_gpu_memory: device memory the streamed run plans for, e.g. 8GiB (see `lite smooth_quant --help`).
        moe_calibrate_all_experts: see `lite calibrate --help`.
    """
    calib = CalibSettings(calib_dataset, calib_samples, calib_seqlen, seed, moe_calibrate_all_experts)
    scheme = dict(bits=w_bits, group_size=w_group_size, symmetric=w_sym, channel_fallback=w_channel_fallback)
    steps = [("awq", {**scheme, "n_grid": n_grid, "clip": mse_clip}), ("rtn", {**scheme, "mse": mse_clip})]
    pipeline.quantize_weights(model, work_dir, steps,
                              format, calib, out_dir, max_shard_size, batch_size, device, dtype, trust_remote_code,
                              max_gpu_memory)


COMMANDS = {"calibrate": calibrate, "smooth": smooth, "export": export, "smooth_quant": smooth_quant,
            "auto_gptq": auto_gptq, "auto_awq": auto_awq, "run": run, "eval": eval}
USAGE = """usage: lite COMMAND MODEL [flags]     (lite COMMAND --help for its flags; lite --version)

commands:
    calibrate      per-channel activation statistics -> WORK_DIR/inputs_stats.pth
    smooth         SmoothQuant migration scales -> WORK_DIR/migration_scales.pth
    export         quantize and write a checkpoint -> WORK_DIR/quantized
    smooth_quant   all three in one command, reusing what WORK_DIR holds
    auto_gptq      weight-only int4 (or 2-8 bits) with GPTQ -> WORK_DIR/quantized
    auto_awq       weight-only int4 with AWQ's activation-aware scales -> WORK_DIR/quantized
    run            a step recipe (configs/recipes/*.yaml): transforms, SmoothQuant, static scales, RTN, GPTQ, AWQ
    eval           perplexity of float models and checkpoints side by side

Errors print one `lite: error:` line; set LITE_DEBUG=1 (or pass --debug) for the traceback."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary files are removed on the way out."""


def _terminate(signum, frame):
    raise Terminated


def _interrupted(signal_name: str, code: int) -> int:
    kept = folders.completed
    what = f"kept {', '.join(kept)} (complete); nothing else was written" if kept else "nothing was written"
    print(f"lite: interrupted ({signal_name}); {what}", file=sys.stderr)
    return code


def dispatch(argv: list[str]) -> int:
    """Run one command line; returns the exit code (errors other than LiteError propagate)."""
    if not argv or argv[0] in ("--help", "-h", "help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        print(f"lite {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"commands: {', '.join(COMMANDS)}"
        raise LiteError(f"unknown command {command!r}; {hint}")
    fn = COMMANDS[command]
    if any(a in ("--help", "-h") for a in argv[1:]):
        print(render_help(command, fn))
        return 0
    argv = expand_recipe(argv, COMMANDS)
    positional, kwargs, global_flags = parse(command, fn, argv[1:])
    if "debug" in global_flags:
        os.environ["LITE_DEBUG"] = "1"
    if "verbose" in global_flags:
        os.environ["LITE_VERBOSE"] = "1"
    fn(*positional, **kwargs)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    folders.completed.clear()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = dispatch(argv)
    except BrokenPipeError:  # `lite ... | head`: the reader went away; nothing to report
        sys.stdout = open(os.devnull, "w")
        code = 0
    except KeyboardInterrupt:
        code = _interrupted("SIGINT", 130)
    except Terminated:
        code = _interrupted("SIGTERM", 143)
    except Exception as e:  # every error ends in one line; the traceback only on request
        if os.environ.get("LITE_DEBUG") == "1" or "--debug" in argv:
            import traceback

            traceback.print_exc()
        if isinstance(e, LiteError):
            message, code = str(e), 2
        elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
            message, code = (f"the disk is full ({e.filename or 'while writing'}); nothing incomplete was kept: "
                             "free some space or choose other --work-dir/--out-dir folders"), 2
        elif isinstance(e, PermissionError):
            message, code = f"permission denied: {e.filename}; pass folders you can write to", 2
        else:
            message, code = (f"unexpected {type(e).__name__}: {e} (a bug in lite: please report it with the "
                             "traceback that LITE_DEBUG=1 prints)"), 1
        print(f"lite: error: {message}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
