"""The `lite` command: wires the stage functions of `lite.pipeline` to `fire`.

The docstrings below are the `--help` text.
"""

import sys

import fire

from lite import pipeline
from lite.errors import LiteError
from lite.pipeline import CalibSettings, SmoothSettings


def calibrate(model, work_dir=None, calib_dataset="wikitext2", calib_samples=128, calib_seqlen=2048,
              batch_size=4, seed=0, device=None, dtype="auto", trust_remote_code=False):
    """Collect per-channel activation statistics, one decoder block at a time.

    Writes WORK_DIR/inputs_stats.pth and WORK_DIR/outputs_stats.pth in lmdeploy's layout
    ({max,min,mean,absmax,absmean} -> {linear fqn -> fp32 tensor}) and records the settings in
    WORK_DIR/lite_manifest.json.

    Args:
        model: a local Hugging Face model folder, a hub id (org/name), or tiny:<model_type> for a small
            random model lite builds itself (tiny:llama, tiny:qwen2, ...).
        work_dir: folder for the artifacts; created if missing. Must not hold another model's files.
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


def smooth(model, work_dir=None, alpha=0.5, w_stat="lmdeploy", calib_dataset="wikitext2", calib_samples=128,
           calib_seqlen=2048, batch_size=4, seed=0, device=None, dtype="auto", trust_remote_code=False):
    """Compute SmoothQuant migration scales s = max|X|^alpha / w^(1-alpha) for every smoothing pair.

    Reads WORK_DIR/inputs_stats.pth (calibrating first when it is missing or was made with other
    calibration settings) and writes WORK_DIR/migration_scales.pth = {consumer linear fqn -> s}.
    Pairs: each block's norms -> the linears they feed, v_proj -> o_proj (one factor per KV channel
    under grouped-query attention) and up_proj -> down_proj.

    Args:
        model: a local model folder, a hub id, or tiny:<model_type>.
        work_dir: folder of the artifacts.
        alpha: migration strength in [0, 1]; 0 leaves activations as they are, 1 moves all of their
            range into the weights.
        w_stat: weight statistic w: lmdeploy (mean over rows of |W| / row max, then s normalized by
            sqrt(max(s)·min(s)); the default, best on our measurements) or absmax (the paper's column max).
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
    pipeline.smooth(model, work_dir, calib, SmoothSettings(float(alpha), w_stat), batch_size, device, dtype,
                    trust_remote_code)


def export(model, work_dir=None, quant_dtype="int8", export_migration_scale=False, max_shard_size="5GB",
           out_dir=None, dtype="auto", trust_remote_code=False):
    """Quantize to W8A8 and write an lmdeploy smooth_quant checkpoint.

    Applies WORK_DIR/migration_scales.pth when present, swaps every linear inside the decoder blocks
    for a QLinear (weights per output channel, activations per token at run time) and the norms
    feeding them for QRMSNorm, and writes sharded safetensors, config.json with
    quantization_config and the tokenizer files. The folder appears only when complete.

    Args:
        model: a local model folder, a hub id, or tiny:<model_type>.
        work_dir: folder of the artifacts.
        quant_dtype: int8 or fp8 (float8 e4m3).
        export_migration_scale: leave norms and producers untouched and store the SmoothQuant factor on
            every QLinear as migration_scale (ones where not smoothed), for engines that cannot fold it.
        max_shard_size: largest safetensors shard, e.g. 5GB or 500MB; an index file is written when
            there is more than one.
        out_dir: where the checkpoint goes (default WORK_DIR/quantized).
        dtype: auto, float32, float16 or bfloat16 (embeddings, norms and lm_head keep it).
        trust_remote_code: allow model code from the hub.
    """
    pipeline.export(model, work_dir, quant_dtype, export_migration_scale, max_shard_size, out_dir, dtype,
                    trust_remote_code)


def smooth_quant(model, work_dir=None, quant_dtype="int8", export_migration_scale=False, alpha=0.5,
                 w_stat="lmdeploy", calib_dataset="wikitext2", calib_samples=128, calib_seqlen=2048,
                 batch_size=4, seed=0, max_shard_size="5GB", out_dir=None, device=None, dtype="auto",
                 trust_remote_code=False):
    """Calibrate, smooth and export in one command, reusing artifacts in WORK_DIR made with the same settings.

    Args:
        model: a local model folder, a hub id, or tiny:<model_type>.
        work_dir: folder of the artifacts and (by default) of the checkpoint, WORK_DIR/quantized.
        quant_dtype: int8 or fp8.
        export_migration_scale: store the factors on the QLinears instead of folding them (see `lite export --help`).
        alpha: migration strength in [0, 1].
        w_stat: lmdeploy (default) or absmax.
        calib_dataset: wikitext2, c4, pileval, ptb, sample, or a .txt/.jsonl/.parquet file.
        calib_samples: number of calibration sequences.
        calib_seqlen: tokens per calibration sequence.
        batch_size: sequences per forward call.
        seed: seed for choosing the calibration windows.
        max_shard_size: largest safetensors shard, e.g. 5GB.
        out_dir: where the checkpoint goes (default WORK_DIR/quantized).
        device: cuda (default when available) or cpu.
        dtype: auto, float32, float16 or bfloat16.
        trust_remote_code: allow model code from the hub.
    """
    calib = CalibSettings(calib_dataset, calib_samples, calib_seqlen, seed)
    pipeline.smooth_quant(model, work_dir, calib, SmoothSettings(float(alpha), w_stat), quant_dtype,
                          export_migration_scale, max_shard_size, out_dir, batch_size, device, dtype,
                          trust_remote_code)


def eval(*models, dataset="wikitext2", seqlen=512, samples=None, batch_size=8, device=None, json_out=None):
    """Perplexity of float models and lite checkpoints, side by side, relative to the first model.

    Args:
        models: model folders, hub ids, tiny:<model_type> names, or folders lite exported.
        dataset: wikitext2, c4, ptb (their test splits), sample, or a .txt/.jsonl/.parquet file.
        seqlen: tokens per window, BOS included; every other token of the window is scored.
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
        fire.Fire(COMMANDS, command=argv, name="lite")
    except LiteError as e:
        print(f"lite: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
