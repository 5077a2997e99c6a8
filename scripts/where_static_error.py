"""Which linear's static input scale costs the KL (issue 9's rotation target): int8 W8A8, static minmax
scales everywhere, then static on one group only (the rest per-token dynamic), with and without
`[fuse_norms, rotate]`; KL from the float model on 24 windows of tinystories-valid.

    python scripts/where_static_error.py     # reads ../shared (stories260K, tinystories)
"""
import torch, copy
from lite import compressed_tensors as ct
from lite.data import calibration_tokens, load_text
from lite.eval import eval_windows, score
from lite.model import decoder_blocks, load_model
from lite.observers import ActSettings
from lite.smooth import migration_scales
from lite.steps.stats import collect_statistics
from lite.steps.transforms import FuseNorms, Rotate, transform_
from lite.qmodules import QLinear
torch.set_num_threads(2)
import os
M = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "stories260K-hf")
T = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "text")
ref = load_model(M, "float32")
windows,_ = eval_windows(ref.tokenizer, load_text(T+"/tinystories-valid.txt", eval_split=True), 512, 24)
for rot in (False, True):
    l = load_model(M, "float32"); model, arch = l.model, l.arch
    if rot: transform_(model, [FuseNorms(), Rotate(seed=0)])
    tokens = calibration_tokens(l.tokenizer, T+"/tinystories-train.txt", 64, 256, 0, 512)
    inputs,_ = collect_statistics(model, arch, tokens, 4, "cpu", progress=False)
    scales = migration_scales(decoder_blocks(model, arch), arch, model.config, inputs["absmax"], 0.3, "lmdeploy")
    ct.quantize_model_(model, "int8", scales, ActSettings("static","minmax"), tokens, 4, "cpu", progress=False)
    for keep in ["all", "qkv", "o_proj", "gate_up", "down_proj"]:
        m = copy.deepcopy(model)
        for name, mod in m.named_modules():
            if isinstance(mod, QLinear) and keep != "all":
                short = name.split(".")[-1]
                group = {"q_proj":"qkv","k_proj":"qkv","v_proj":"qkv","o_proj":"o_proj","gate_proj":"gate_up","up_proj":"gate_up","down_proj":"down_proj"}[short]
                if group != keep: mod.input_scale = None
        r = score(m, windows, 8, "cpu", ref.model, progress=False)
        print("rotated" if rot else "plain  ", f"static only on {keep:<9}", f"KL {1e3*r['kl']:.3f}")
