"""The streamed one-pass smooth_quant gives exactly what the full-load pipeline gives (CPU)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import fused_model
from lite import pipeline, source, stream
from lite.folders import MARKER
from lite.observers import ActSettings
from lite.model import build_tiny, byte_tokenizer, load_model, tiny_config, weights_hash
from lite.settings import CalibSettings, SmoothSettings
from lite.shards import ShardReader, ShardWriter
from lite.sweep import plan_memory

CALIB = CalibSettings("sample", 4, 48, 0)


# Families whose checkpoints store the experts fused (3-D tensors), as transformers writes them.
FUSED_ON_DISK = {"gpt_oss"}


def save_model(tmp_path, model_type, **overrides):
    folder = str(tmp_path / "model")
    model = fused_model(model_type, torch.bfloat16) if model_type in FUSED_ON_DISK else \
        build_tiny(model_type, dtype=torch.bfloat16, **overrides)
    model.save_pretrained(folder, max_shard_size="40KB")
    byte_tokenizer().save_pretrained(folder)
    return folder


def run_both(tmp_path, folder, monkeypatch, **kwargs):
    """Output folders of the streamed and of the full-load smooth_quant with the same settings."""
    settings = dict(batch_size=2, device="cpu", max_shard_size="30KB", **kwargs)
    streamed = pipeline.smooth_quant(folder, str(tmp_path / "w_stream"), CALIB, SmoothSettings(), **settings)
    monkeypatch.setattr(stream, "is_streamable", lambda source: False)
    full = pipeline.smooth_quant(folder, str(tmp_path / "w_full"), CALIB, SmoothSettings(), **settings)
    monkeypatch.undo()
    return streamed, full


def assert_same_folders(a, b):
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    assert any(name.endswith(".safetensors") for name in os.listdir(a))
    for name in os.listdir(a):
        if name == MARKER:  # names its own work dir; the settings it records must agree
            markers = [json.load(open(os.path.join(folder, name))) for folder in (a, b)]
            assert markers[0]["export"] == markers[1]["export"] and markers[0]["work_dir"] != markers[1]["work_dir"]
            continue
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), f"{name} differs"


@pytest.mark.parametrize("model_type,overrides,export_migration_scale,fmt,act", [
    ("llama", {"tie_word_embeddings": False}, False, "lmdeploy", "dynamic"),
    ("llama", {}, True, "lmdeploy", "dynamic"),  # tied embeddings, migration scales stored on the QLinears
    ("gemma", {}, False, "lmdeploy", "dynamic"),  # offset norms, an embed_scale buffer rebuilt from the config
    ("phi3", {"tie_word_embeddings": False}, False, "lmdeploy", "dynamic"),  # packed qkv_proj / gate_up_proj
    ("llama", {}, False, "compressed-tensors", "dynamic"),  # norms stay plain, weight_scale names, ignore list
    ("phi3", {"tie_word_embeddings": False}, False, "compressed-tensors", "dynamic"),
    ("llama", {}, False, "compressed-tensors", "minmax"),  # static input scales, observed on the smoothed model
    ("qwen2", {}, False, "compressed-tensors", "mse"),
    ("phi3", {"tie_word_embeddings": False}, False, "compressed-tensors", "percentile"),
    ("qwen3_moe", {}, False, "lmdeploy", "dynamic"),  # per-expert linears read by their checkpoint names
    ("olmoe", {}, True, "lmdeploy", "dynamic"),
    ("qwen2_moe", {}, False, "compressed-tensors", "minmax"),  # a shared expert; routers float, in `ignore`
    ("gemma3_text", {}, False, "lmdeploy", "dynamic"),  # sandwich norms; sliding and full layers
    ("phi", {"tie_word_embeddings": False}, False, "compressed-tensors", "dynamic"),  # LayerNorm and lm_head biases
    ("starcoder2", {}, True, "lmdeploy", "dynamic"),
    ("cohere2", {}, False, "compressed-tensors", "minmax"),  # one LayerNorm feeds attention and MLP
    ("olmo3", {}, False, "lmdeploy", "dynamic"),  # norms after attention and MLP only
    ("exaone", {}, False, "compressed-tensors", "dynamic"),  # checkpoint names transformers renames at load
    ("deepseek_v3", {}, False, "lmdeploy", "dynamic"),  # latent attention; a dense block, then MoE blocks
    ("deepseek_v3", {}, False, "compressed-tensors", "minmax"),
    ("deepseek_v2", {"q_lora_rank": None}, False, "lmdeploy", "dynamic"),  # V2-Lite: q_proj, no query LoRA
    ("gpt_oss", {}, True, "lmdeploy", "dynamic"),  # experts fused on disk (transposed, interleaved, biases)
    ("gpt_oss", {}, False, "compressed-tensors", "minmax"),
])
def test_streamed_equals_full_load(tmp_path, monkeypatch, model_type, overrides, export_migration_scale, fmt, act):
    folder = save_model(tmp_path, model_type, **overrides)
    assert source.open_streamed(folder) is not None  # else both runs would load the model
    act = ActSettings() if act == "dynamic" else ActSettings("static", act)
    streamed, full = run_both(tmp_path, folder, monkeypatch, export_migration_scale=export_migration_scale, fmt=fmt,
                              act=act)
    assert_same_folders(streamed, full)  # bit for bit: every tensor, config.json, index, tokenizer
    for name in ("inputs_stats.pth", "outputs_stats.pth", "migration_scales.pth"):
        x = torch.load(tmp_path / "w_stream" / name, weights_only=True)
        y = torch.load(tmp_path / "w_full" / name, weights_only=True)
        if name == "migration_scales.pth":
            x, y = {"s": x}, {"s": y}
        for stat in y:
            assert x[stat].keys() == y[stat].keys()
            assert all(torch.equal(x[stat][fqn], y[stat][fqn]) for fqn in y[stat]), (name, stat)
    manifests = [json.load(open(tmp_path / w / pipeline.MANIFEST)) for w in ("w_stream", "w_full")]
    for m in manifests:  # the only difference allowed: each export names its own folder
        assert m["artifacts"]["export"].pop("out_dir").startswith(str(tmp_path))
    assert manifests[0] == manifests[1]  # the same keys and values for every artifact, file hashes included


@pytest.mark.parametrize("recipe", ["w8a8-int8.yaml", "w8a8-int8-static.yaml", "w8a8-int8-gptq.yaml",
                                    "no-smoothquant-static", "no-smoothquant"])
def test_a_recipe_streams_and_writes_what_the_loaded_run_writes(tmp_path, monkeypatch, recipe):
    """`lite run` streams a local folder (only recipes with transforms load the model): the same folder,
    artifacts and manifest as the run on the loaded model, through the same sweep."""
    import shutil

    import yaml

    from lite.cli.main import main

    configs = os.path.join(os.path.dirname(__file__), "..", "configs", "recipes")
    if recipe.startswith("no-smoothquant"):
        steps = ([{"static_scales": {"act_observer": "minmax"}}] if recipe.endswith("static") else []) + ["rtn"]
        path = tmp_path / f"{recipe}.yaml"
        path.write_text(yaml.safe_dump({"steps": steps, "format": "compressed-tensors"}))
    else:
        path = tmp_path / recipe
        shutil.copy(os.path.join(configs, recipe), path)
    folder = save_model(tmp_path, "llama")
    opened = []
    real = source.open_streamed
    monkeypatch.setattr(source, "open_streamed", lambda *a, **k: opened.append(real(*a, **k)) or opened[-1])
    args = ["--calib-dataset", "random", "--calib-samples", "4", "--calib-seqlen", "32", "--device", "cpu",
            "--max-shard-size", "30KB"]
    main(["run", str(path), folder, "--work-dir", str(tmp_path / "w_stream"), *args])
    assert opened and opened[0] is not None, "the recipe did not stream"
    monkeypatch.setattr(stream, "is_streamable", lambda source: False)
    main(["run", str(path), folder, "--work-dir", str(tmp_path / "w_full"), *args])
    assert_same_folders(tmp_path / "w_stream" / "quantized", tmp_path / "w_full" / "quantized")
    manifests = [json.load(open(tmp_path / w / pipeline.MANIFEST)) for w in ("w_stream", "w_full")]
    for m in manifests:
        assert m["artifacts"]["export"].pop("out_dir").startswith(str(tmp_path))
    assert manifests[0] == manifests[1]


@pytest.mark.parametrize("fmt,act", [("lmdeploy", "dynamic"), ("compressed-tensors", "minmax")])
def test_streamed_readback_catches_a_tensor_written_wrong_and_publishes_nothing(tmp_path, monkeypatch, capsys,
                                                                               fmt, act):
    """The block-by-block read-back of a streamed export reads the folder with the format's reader: one
    weight scale written 1 % off (what a wrong name, dtype or layout does, and worse) fails it, and the
    output folder never appears; written right, the last block's outputs agree exactly."""
    from lite.errors import LiteError
    from lite.export import CheckpointWriter

    folder = save_model(tmp_path, "llama")
    act = ActSettings() if act == "dynamic" else ActSettings("static", act)
    settings = dict(batch_size=2, device="cpu", max_shard_size="30KB", fmt=fmt, act=act)
    pipeline.smooth_quant(folder, str(tmp_path / "good"), CALIB, SmoothSettings(), **settings)
    assert "max |difference| of the last block's output 0 " in capsys.readouterr().out
    write = CheckpointWriter.write

    def off_by_one_percent(self, name, t, row_start=0):
        if name == "model.layers.1.self_attn.o_proj.scale":
            t = t * 1.01
        write(self, name, t, row_start)

    monkeypatch.setattr(CheckpointWriter, "write", off_by_one_percent)
    with pytest.raises(LiteError, match="read back gives last-block outputs"):
        pipeline.smooth_quant(folder, str(tmp_path / "bad"), CALIB, SmoothSettings(), **settings)
    assert not (tmp_path / "bad" / "quantized").exists()


@pytest.mark.parametrize("fmt,scale", [("compressed-tensors", "weight_scale"), ("awq", "scales"), ("gptq", "scales")])
def test_a_weight_only_export_is_read_back_block_by_block_before_it_is_published(tmp_path, monkeypatch, capsys,
                                                                                 fmt, scale):
    """`lite auto_gptq` over a streamed folder reads the written folder back with the weight-only reader,
    block by block: right, the last block's outputs agree exactly; one group scale 1 % off fails it and
    publishes nothing."""
    from lite.cli.main import main
    from lite.errors import LiteError
    from lite.export import CheckpointWriter

    folder = save_model(tmp_path, "llama")
    args = ["--format", fmt, "--w-group-size", "32", "--calib-dataset", "random", "--calib-samples", "4",
            "--calib-seqlen", "32", "--device", "cpu"]
    main(["auto_gptq", folder, "--work-dir", str(tmp_path / "good"), *args])
    assert "max |difference| of the last block's output 0 " in capsys.readouterr().out
    write = CheckpointWriter.write

    def off_by_one_percent(self, name, t, row_start=0):
        if name == f"model.layers.1.self_attn.o_proj.{scale}":
            t = (t.float() * 1.01).to(t.dtype)
        write(self, name, t, row_start)

    monkeypatch.setattr(CheckpointWriter, "write", off_by_one_percent)
    with pytest.raises(LiteError, match="read back gives last-block outputs"):
        pipeline.quantize_weights(folder, str(tmp_path / "bad"), [("gptq", {"group_size": 32})], fmt,
                                  CalibSettings("random", 4, 32), device="cpu")
    assert not (tmp_path / "bad" / "quantized").exists()


def test_static_scales_read_the_weights_once(tmp_path, monkeypatch):
    """`smooth_quant --act-scheme static` takes statistics of the float model and static scales of the
    smoothed one in one read of the weights (the sweep's second chain); the output equals the loaded
    path's (test_streamed_equals_full_load)."""
    folder = save_model(tmp_path, "llama")
    reads = []
    fetch = source.Shards.fetch

    def counting(self, prefix, device, copy_stream):
        if self.sm.folder == folder:  # not the read-back of the written folder
            reads.append(prefix)
        return fetch(self, prefix, device, copy_stream)

    monkeypatch.setattr(source.Shards, "fetch", counting)
    pipeline.smooth_quant(folder, str(tmp_path / "w"), CALIB, SmoothSettings(), batch_size=2, device="cpu",
                          fmt="compressed-tensors", act=ActSettings("static", "minmax"))
    assert reads == ["model.layers.0", "model.layers.1"]


def test_streamed_identity_matches_loaded_model(tmp_path):
    folder = save_model(tmp_path, "qwen2")
    streamed = source.open_streamed(folder, "float32")
    assert source.streamed_weights_hash(streamed) == weights_hash(load_model(folder, "float32").model)


def test_existing_statistics_take_the_full_load_path(tmp_path, monkeypatch):
    """A work dir with artifacts is reused by the existing path; streaming never overwrites them."""
    folder = save_model(tmp_path, "llama")
    work = tmp_path / "w"
    pipeline.calibrate(folder, str(work), CALIB, batch_size=2, device="cpu")
    called = []
    monkeypatch.setattr(stream, "stream_smooth_quant", lambda *a, **k: called.append(1))
    out = pipeline.smooth_quant(folder, str(work), CALIB, SmoothSettings(), batch_size="auto", device="cpu")
    assert not called and os.path.isfile(os.path.join(out, "config.json"))


def test_tensors_read_in_parallel_pieces_are_whole_and_a_truncated_file_still_fails(tmp_path, monkeypatch):
    from lite import shards
    from lite.errors import LiteError

    monkeypatch.setattr(shards, "READ_PIECE", 1000)  # bytes: every tensor here is several pieces
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 101, generator=g), "b": torch.randint(-128, 127, (5000,), generator=g,
                                                                          dtype=torch.int8), "c": torch.zeros(0)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    back = ShardReader(str(tmp_path)).read(list(tensors))
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    reader = ShardReader(str(tmp_path))
    with open(tmp_path / "model.safetensors", "r+b") as f:  # cut after the header was read
        f.truncate(os.path.getsize(tmp_path / "model.safetensors") - 3000)
    with pytest.raises(LiteError, match="truncated"):
        reader.read(list(tensors))


def test_shard_writer_writes_what_save_file_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randint(-128, 127, (3, 5), generator=g, dtype=torch.int8),
               "a.scale": torch.rand(3, 1, generator=g), "c": torch.rand(4, generator=g).to(torch.bfloat16),
               "d": torch.rand(2, generator=g).to(torch.float8_e4m3fn), "e": torch.ones((), dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    writer = ShardWriter(str(tmp_path), [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 1 << 30)
    for name in reversed(list(tensors)):  # any order
        writer.write(name, tensors[name])
    writer.close()
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = ShardReader(str(tmp_path)).read(list(tensors))
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name].float(), t.float())
    assert torch.equal(ShardReader(str(tmp_path)).read_elements("a.scale", [0, 2]), tensors["a.scale"].reshape(-1)[[0, 2]])


def test_plan_memory_keeps_activations_on_device_only_when_they_fit():
    gib = 2**30
    # Llama-3-8B shapes in bf16: a block is 0.44 GB, 128 samples of 2048 tokens 2 GiB of hidden states.
    block, sample, per_sample = 436 * 10**6, 2048 * 4096 * 2, 2048 * 360_000
    on_device, batch = plan_memory(8 * gib, block, sample, 128, per_sample, "auto")
    assert on_device and batch >= 2
    on_device, batch = plan_memory(3 * gib, block, sample, 128, per_sample, "auto")
    assert not on_device and batch >= 1
    assert plan_memory(8 * gib, block, sample, 128, per_sample, 3) == (True, 3)


def test_the_memory_plan_counts_the_score_matrix_of_eager_attention():
    """gpt_oss's attention has no SDPA path: its eager forward holds (heads, seqlen, seqlen + 1) scores in
    the model dtype, their fp32 softmax and the probabilities. The plan's bytes per sample must cover them
    (counted here from the shapes), and the planned batch of gpt-oss-20b's shape stay within the budget."""
    from lite.sweep import per_token_bytes

    config = tiny_config("gpt_oss", hidden_size=2880, intermediate_size=2880, num_attention_heads=64, head_dim=64)
    model = build_tiny("gpt_oss")
    assert model.config._attn_implementation == "eager"
    config._attn_implementation = "eager"
    seqlen = 2048
    scores = 64 * seqlen * (seqlen + 1) * (2 + 4 + 2)  # bf16 scores, fp32 softmax, bf16 probabilities
    per_sample = seqlen * per_token_bytes(config, 2, seqlen)
    assert per_sample >= scores
    block = 1_600_000_000  # one gpt-oss-20b block in bf16
    _, batch = plan_memory(8 * 2**30, block, seqlen * 2880 * 2, 128, per_sample, "auto")
    assert 2 * block + batch * scores <= 8 * 2**30


def test_the_memory_plan_counts_the_copies_that_the_steps_observers_make(monkeypatch):
    """The statistics and minmax observers reduce activations without copying them; percentile and mse
    sample |x| with random keys (an fp32 copy and more). The plan takes the largest of the steps'."""
    import copy

    import lite.sweep as sweep_module
    from lite.archs import arch_for
    from lite.source import Loaded
    from lite.sweep import sweep
    from lite.steps.readback import ReadbackRecord
    from lite.steps.rtn import Rtn
    from lite.steps.smoothquant import SmoothQuant
    from lite.steps.static_scales import StaticScales
    from lite.steps.stats import Statistics

    config = tiny_config("llama", hidden_size=4096, intermediate_size=14336)
    assert sweep_module.per_token_bytes(config, 2, 2048, 8) - sweep_module.per_token_bytes(config, 2, 2048, 0) \
        == 8 * 14336
    seen = []
    real = sweep_module.per_token_bytes
    monkeypatch.setattr(sweep_module, "per_token_bytes",
                        lambda config, esize, seqlen, copy_bytes=8: seen.append(copy_bytes) or real(config, esize,
                                                                                                     seqlen, copy_bytes))
    model = build_tiny("llama")
    tokens = torch.randint(0, 256, (2, 16))
    for act, expected in ((ActSettings("static", "minmax"), 0), (ActSettings("static", "mse"), 8)):
        steps = [Statistics(), SmoothQuant(fold=True), StaticScales(act, torch.int8)]
        sweep(Loaded(copy.deepcopy(model), arch_for(model.config)), steps, tokens, progress=False)
        assert seen[-1] == expected
    assert Rtn("int8").activation_copy_bytes == 0 and ReadbackRecord().activation_copy_bytes == 0
    assert Rtn("int8", bits=4, mse=True).activation_copy_bytes == 8


def test_row_chunked_folding_and_quantization_are_exact(monkeypatch):
    """Large weights are smoothed and quantized a chunk of rows at a time: the same bits as all at once."""
    from lite import quant, smooth
    from lite.qmodules import QLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    s = torch.rand(64) + 0.5

    def folded_copies():
        """Two copies of `linear`: one with columns scaled, one with rows 10..49 divided."""
        copies = [torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16) for _ in range(2)]
        for w in copies:
            w.load_state_dict(linear.state_dict())
        smooth.scale_columns_(copies[0], s)
        smooth.divide_rows_(copies[1], s[:48].repeat(2)[:40], slice(10, 50))
        return copies

    whole = folded_copies()
    q_whole = QLinear.from_linear(linear, torch.int8, s)
    stat_whole = smooth.weight_statistic([linear.weight, whole[0].weight], "lmdeploy")
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows per chunk
    monkeypatch.setattr(smooth, "CHUNK_ELEMENTS", 64 * 7)
    chunked = folded_copies()
    q_chunked = QLinear.from_linear(linear, torch.int8, s)
    for a, b in zip(whole, chunked):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(q_whole.weight, q_chunked.weight) and torch.equal(q_whole.scale, q_chunked.scale)
    stat_chunked = smooth.weight_statistic([linear.weight, whole[0].weight], "lmdeploy")
    assert torch.allclose(stat_whole, stat_chunked, rtol=1e-5, atol=0)


def run_stages(folder, work, stages, streamed, monkeypatch, export_migration_scale=False, no_smooth=False):
    """Run the stand-alone stages in order into `work`, streamed (load_model must not be called) or full-load."""
    with monkeypatch.context() as m:
        if streamed:
            m.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the streamed stage loaded the model"))
        else:
            m.setattr(stream, "is_streamable", lambda source: False)
        for stage in stages:
            if stage == "calibrate":
                pipeline.calibrate(folder, work, CALIB, batch_size=2, device="cpu")
            elif stage == "smooth":
                pipeline.smooth(folder, work, CALIB, SmoothSettings(), batch_size=2, device="cpu")
            else:
                pipeline.export(folder, work, export_migration_scale=export_migration_scale, max_shard_size="30KB",
                                no_smooth=no_smooth, device="cpu")


def assert_same_work_dirs(a, b):
    """Every artifact tensor for tensor, the whole manifests alike (the export's folder aside: it names
    its own work dir), and the output folders byte for byte."""
    for name in ("inputs_stats.pth", "outputs_stats.pth", "migration_scales.pth"):
        assert os.path.isfile(os.path.join(a, name)) == os.path.isfile(os.path.join(b, name)), name
        if not os.path.isfile(os.path.join(a, name)):
            continue
        x = torch.load(os.path.join(a, name), weights_only=True)
        y = torch.load(os.path.join(b, name), weights_only=True)
        if name == "migration_scales.pth":
            x, y = {"s": x}, {"s": y}
        assert x.keys() == y.keys()
        for stat in y:
            assert x[stat].keys() == y[stat].keys()
            assert all(torch.equal(x[stat][fqn], y[stat][fqn]) for fqn in y[stat]), (name, stat)
    manifests = [json.load(open(os.path.join(w, pipeline.MANIFEST))) for w in (a, b)]
    assert manifests[0]["model"] == manifests[1]["model"]
    artifacts = [m["artifacts"] for m in manifests]
    assert artifacts[0].keys() == artifacts[1].keys()
    if "export" in artifacts[0]:
        for m in artifacts:
            m["export"].pop("out_dir")
        assert_same_folders(os.path.join(a, "quantized"), os.path.join(b, "quantized"))
    assert artifacts[0] == artifacts[1]


@pytest.mark.parametrize("model_type,overrides,export_migration_scale", [
    ("llama", {"tie_word_embeddings": False}, False),
    ("llama", {}, True),  # tied embeddings, migration scales stored on the QLinears
    ("gemma", {}, False),  # offset norms
    ("phi3", {"tie_word_embeddings": False}, False),  # packed qkv_proj / gate_up_proj
])
def test_streamed_stages_equal_full_load(tmp_path, monkeypatch, model_type, overrides, export_migration_scale):
    """calibrate → smooth → export, each stand-alone stage streamed, gives what the full-load stages give."""
    folder = save_model(tmp_path, model_type, **overrides)
    stages = ("calibrate", "smooth", "export")
    for streamed, work in ((True, "w_stream"), (False, "w_full")):
        run_stages(folder, str(tmp_path / work), stages, streamed, monkeypatch, export_migration_scale)
    assert_same_work_dirs(str(tmp_path / "w_stream"), str(tmp_path / "w_full"))


@pytest.mark.parametrize("stages,kwargs", [
    (("calibrate",), {}),
    (("smooth",), {}),  # no statistics yet: calibrated in the same pass
    (("export",), {}),  # no migration scales: quantized unsmoothed
    (("export",), {"export_migration_scale": True}),  # every migration_scale ones
])
def test_each_streamed_stage_equals_full_load(tmp_path, monkeypatch, stages, kwargs):
    folder = save_model(tmp_path, "qwen2")
    for streamed, work in ((True, "w_stream"), (False, "w_full")):
        run_stages(folder, str(tmp_path / work), stages, streamed, monkeypatch, **kwargs)
    assert_same_work_dirs(str(tmp_path / "w_stream"), str(tmp_path / "w_full"))


def test_streamed_stages_reuse_full_load_artifacts(tmp_path, monkeypatch):
    """Artifacts from one path feed the other: full-load statistics → streamed smooth → streamed export
    (with --no-smooth) gives what the full-load path gives."""
    folder = save_model(tmp_path, "llama", tie_word_embeddings=False)
    for work in ("w_stream", "w_full"):
        run_stages(folder, str(tmp_path / work), ("calibrate",), False, monkeypatch)
    run_stages(folder, str(tmp_path / "w_stream"), ("smooth", "export"), True, monkeypatch, no_smooth=True)
    run_stages(folder, str(tmp_path / "w_full"), ("smooth", "export"), False, monkeypatch, no_smooth=True)
    assert_same_work_dirs(str(tmp_path / "w_stream"), str(tmp_path / "w_full"))


def test_a_hub_id_is_downloaded_then_streamed(tmp_path, monkeypatch):
    """The hub code path with the download replaced by a local folder: the model is never loaded whole."""
    from lite import model as models

    folder = save_model(tmp_path, "llama")
    asked = []
    monkeypatch.setattr(models, "download", lambda repo_id: asked.append(repo_id) or folder)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the hub model was loaded whole"))

    out = pipeline.smooth_quant("some-org/some-model", str(tmp_path / "w"), CALIB, SmoothSettings(), device="cpu")

    assert asked == ["some-org/some-model"] and os.path.isfile(os.path.join(out, "config.json"))


def test_a_checkpoint_under_other_names_is_read_and_written_under_them(tmp_path):
    """exaone's checkpoint calls llama's modules `transformer.h.{i}.attn.attention.q_proj`, ...: the streamed
    run reads them by the record's name map and writes the quantized checkpoint under the same names,
    which transformers' own loader maps again."""
    folder = save_model(tmp_path, "exaone")
    stored = set(ShardReader(folder).entries)
    assert "transformer.h.0.attn.attention.q_proj.weight" in stored and not any(".self_attn." in n for n in stored)
    assert source.open_streamed(folder) is not None
    out = pipeline.smooth_quant(folder, str(tmp_path / "w"), CALIB, SmoothSettings(), batch_size=2, device="cpu",
                                fmt="compressed-tensors")
    written = set(ShardReader(out).entries)
    assert "transformer.h.1.mlp.c_fc_0.weight_scale" in written and not any(".self_attn." in n for n in written)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # raises on a missing or unexpected tensor
    assert model.model.layers[1].mlp.gate_proj.weight.dtype == torch.int8


def test_a_checkpoint_without_the_model_prefix_is_loaded_as_transformers_loads_it(tmp_path):
    """Keys transformers maps at load time but the record does not (no `model.` prefix): the run loads
    the model with transformers instead of failing on a missing key."""
    folder = save_model(tmp_path, "llama")
    path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(path))
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(os.path.join(folder, shard))
        save_file({k.removeprefix("model."): v for k, v in tensors.items()}, os.path.join(folder, shard),
                  metadata={"format": "pt"})
    index["weight_map"] = {k.removeprefix("model."): v for k, v in index["weight_map"].items()}
    json.dump(index, open(path, "w"))
    assert source.open_streamed(folder) is None
    out = pipeline.smooth_quant(folder, str(tmp_path / "w"), CALIB, SmoothSettings(), batch_size=2, device="cpu")
    assert "model.layers.0.self_attn.q_proj.weight" in ShardReader(out).entries


def test_a_checkpoint_missing_a_tensor_is_refused_in_one_line_not_started_from_random_values(tmp_path, capsys):
    """Streamed or loaded by transformers (which would start the missing weight from random values and only
    warn), a checkpoint without one of the model's tensors is an error naming it, before any output."""
    from helpers import lite_error

    folder = save_model(tmp_path, "llama")
    path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(path))
    gone = "model.layers.1.mlp.down_proj.weight"
    shard = os.path.join(folder, index["weight_map"].pop(gone))
    tensors = load_file(shard)
    del tensors[gone]
    save_file(tensors, shard, metadata={"format": "pt"})
    json.dump(index, open(path, "w"))
    message = lite_error(capsys, "smooth_quant", folder, "--work-dir", tmp_path / "w", "--calib-dataset", "sample",
                         "--calib-samples", "4", "--calib-seqlen", "48", "--device", "cpu")
    assert gone in message
    assert not os.path.exists(tmp_path / "w" / "quantized")
