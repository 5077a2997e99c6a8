"""The `lite` command: wires the stage functions of `lite.pipeline` to `fire`.

The docstrings below are the `--help` text. `--recipe FILE` is expanded into flags by `main` before
fire calls a command (lite/recipes.py); the `recipe` parameters exist so that `--help` lists it.
"""

import sys

import fire

from lite import pipeline
from lite.errors import LiteError
from lite.observers import ActSettings
from lite.pipeline import CalibSettings, SmoothSettings
from lite.recipes import expand_recipe


def calibrate(model, work_dir=None, recipe=None, calib_dataset="wikitext2", calib_samples=128, calib_seqlen=2048,
              batch_size=4, seed=0, device=None, dtype="auto", trust_remote_code=False):
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
    """
    calib = CalibSettings(calib_dataset, calib_samples, calib_seqlen, seed)
    pipeline.calibrate(model, work_dir, calib, batch_size, device, dtype, trust_remote_code)


def smooth(model, work_dir=None, recipe=None, alpha=0.3, w_stat="lmdeploy", quant_dtype="int8", calib_dataset="wikitext2",
           calib_samples=128, calib_seqlen=2048, batch_size=4, seed=0, device=None, dtype="auto",
           trust_remote_code=False):
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
        calib_dataset: see `lite calibrate --help`; used only when statistics must be (re)made.
        calib_samples: see `lite calibrate --help`.
        calib_seqlen: see `lite calibrate --help`.
        batch_size: see `lite calibrate --help`.
        seed: see `lite calibrate --help`.
        device: cuda (default when available) or cpu.
        dtype: auto, float32, float16 or bfloat16.
        trust_remote_code: allow model code from the hub.
    """
    calib = CalibSettings(calib_dataset, calib_samples, calib_seqlen, seed)
    pipeline.smooth(model, work_dir, calib, SmoothSettings(alpha, w_stat, quant_dtype), batch_size, device, dtype,
                    trust_remote_code)


def export(model, work_dir=None, recipe=None, quant_dtype="int8", export_migration_scale=False, max_shard_size="5GB",
           out_dir=None, dtype="auto", trust_remote_code=False, format="lmdeploy", act_scheme="dynamic",
           act_observer="minmax", act_percentile=99.99, no_smooth=False, batch_size=4, device=None):
    """Quantize to W8A8 and write an lmdeploy smooth_quant or a compressed-tensors checkpoint.

    Applies WORK_DIR/migration_scales.pth when present (unless --no-smooth), swaps every linear inside
    the decoder blocks for a QLinear (weights per output channel; activations per token at run time,
    or per tensor with calibrated static scales) and writes sharded safetensors, config.json with
    quantization_config and the tokenizer files. lmdeploy format also turns the norms feeding the
    linears into QRMSNorm; compressed-tensors keeps them plain with the smoothing folded in. The
    folder appears only when complete; it is then read back and its logits compared with the
    in-memory model's. For a local safetensors folder in lmdeploy format with dynamic activations,
    the model is never loaded whole: each block is read from the shards, quantized and written to
    the output shards in turn (no read-back check then; the result is the same, tensor for tensor).

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
                    trust_remote_code, format, ActSettings(act_scheme, act_observer, float(act_percentile)),
                    bool(no_smooth), batch_size, device)


def smooth_quant(model, work_dir=None, recipe=None, quant_dtype="int8", export_migration_scale=False, alpha=0.3,
                 w_stat="lmdeploy", calib_dataset="wikitext2", calib_samples=128, calib_seqlen=2048,
                 batch_size="auto", seed=0, max_shard_size="5GB", out_dir=None, device=None, dtype="auto",
                 trust_remote_code=False, format="lmdeploy", act_scheme="dynamic", act_observer="minmax",
                 act_percentile=99.99, no_smooth=False, max_gpu_memory="8GiB"):
    """Calibrate, smooth and export in one command, reusing artifacts in WORK_DIR made with the same settings.

    For a local folder of safetensors with no statistics or scales in WORK_DIR yet (lmdeploy format,
    dynamic activations), all three run in one pass over the decoder blocks, streamed from the shards:
    memory for one or two blocks and the calibration activations, not for the model.

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
        calib_dataset: wikitext2, c4, pileval, ptb, sample, or a .txt/.jsonl/.parquet file.
        calib_samples: number of calibration sequences.
        calib_seqlen: tokens per calibration sequence.
        batch_size: sequences per forward call, or auto: as many as --max-gpu-memory allows when
            streaming (4 otherwise).
        seed: seed for choosing the calibration windows.
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
    """
    calib = CalibSettings(calib_dataset, calib_samples, calib_seqlen, seed)
    pipeline.smooth_quant(model, work_dir, calib, SmoothSettings(alpha, w_stat, quant_dtype), quant_dtype,
                          export_migration_scale, max_shard_size, out_dir, batch_size, device, dtype,
                          trust_remote_code, format, ActSettings(act_scheme, act_observer, float(act_percentile)),
                          bool(no_smooth), max_gpu_memory)


def eval(*models, dataset="wikitext2", seqlen=512, samples=None, batch_size=8, device=None, json_out=None):
    """Perplexity of float models and lite checkpoints, side by side, relative to the first model.

    Args:
        models: model folders, hub ids, tiny:<model_type> names, or folders lite exported.
        dataset: wikitext2, c4, ptb (their test splits), sample, or a .txt/.jsonl/.parquet file.
        seqlen: tokens per window, BOS included; every token after BOS is scored.
        samples: use at most this many windows (default: the whole text).
        batch_size: windows per forward call.
        device: cuda (default when available) or cpu.
        json_out: also write the table to this JSON file.
    """
    from lite.eval import evaluate

    evaluate(list(models), dataset, seqlen, samples, batch_size, device, json_out)


COMMANDS = {"calibrate": calibrate, "smooth": smooth, "export": export, "smooth_quant": smooth_quant, "eval": eval}


def main(argv=None):
    try:
        argv = expand_recipe(list(sys.argv[1:] if argv is None else argv), COMMANDS)
        fire.Fire(COMMANDS, command=argv, name="lite")
    except LiteError as e:
        print(f"lite: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
