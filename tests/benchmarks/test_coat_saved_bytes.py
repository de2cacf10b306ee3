"""benchmarks/coat_saved_bytes.py: COAT mode saves, per Llama-style block, exactly the bytes of COAT's scheme
(coat.md §3) and at most half of what the BF16 block saves."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# a Llama-2-7B layer scaled down 4x: the same ffn / dim ratio (11008 / 4096) and head_dim 128
DIM, FFN, HEADS, SEQ = 1024, 2752, 8, 64


def _script():
    spec = importlib.util.spec_from_file_location("coat_saved_bytes", ROOT / "benchmarks" / "coat_saved_bytes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_coat_block_saves_exactly_coats_scheme():
    """Per token: each norm its input as E4M3 + an fp32 scale per 16 (1.25 B per channel); q, k and v one shared
    E4M3 copy of their input (and gate / up one of theirs); SDPA its bf16 q, k, v, output and fp32 log-sum-exp,
    which wo's input is (no copy); the SwiGLU both inputs in 1 x 16 groups; w2 its input as E4M3. No FP8 weight
    copy is kept for backward."""
    mod = _script()
    rows = mod.block_account("coat", DIM, FFN, HEADS, SEQ)
    group = lambda n: n + (n // 16) * 4  # noqa: E731  E4M3 codes + fp32 scale per 16
    per_token = 2 * group(DIM) + DIM + 4 * 2 * DIM + 4 * HEADS + DIM + 2 * group(FFN) + FFN
    scalars = 3 * 4  # the per-tensor scales of the three shared linear inputs
    assert sum(r.nbytes for r in rows) == SEQ * per_token + scalars
    assert not [r for r in rows if r.kind == "activation" and r.nbytes and r.shape in {(DIM, DIM), (FFN, DIM), (DIM, FFN)}]
    by_module = {}
    for r in rows:
        by_module[r.module] = by_module.get(r.module, 0) + r.nbytes
    assert by_module["attention.wk"] == by_module["attention.wv"] == by_module["feed_forward.w3"] == 0
    assert by_module["attention.wo"] == 0


def test_coat_saves_at_most_half_of_bf16():
    mod = _script()
    bf16, coat = (sum(r.nbytes for r in mod.block_account(m, DIM, FFN, HEADS, SEQ)) / (SEQ * DIM)
                  for m in ("bf16", "coat"))
    assert 40 < bf16 < 50  # B per token per channel: COAT's table counts 45.3 for the BF16 Llama layer
    assert coat <= 0.5 * bf16 and coat < 26.7  # COAT's own 13.33 U (26.7 B): 0.59x


def test_cli_prints_the_table():
    p = subprocess.run([sys.executable, "benchmarks/coat_saved_bytes.py", "--dim", "64", "--ffn", "176", "--heads", "1",
                        "--seq", "16", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "feed_forward.w2" in p.stdout and "float8_e4m3fn" in p.stdout  # the per-op rows
    table = {l.split("|")[0].strip(): [float(c) for c in l.split("|")[1:]] for l in p.stdout.splitlines()
             if l.startswith(("bf16 ", "coat "))}
    assert table["bf16"][2] == 1.0 and 0 < table["coat"][2] < 1


def test_sana_block_saves_under_half_of_bf16():
    """A SANA block (tiny preset, the 1.6B one gives the same 0.49x at 1024 tokens): the modulated norms, q/k
    norms, SiLU and GLU inputs in FP8, and the depthwise conv's bf16 input not kept at all (recomputed from
    SiLU's FP8 input)."""
    mod = _script()
    (bf16, c), (coat, _) = (mod.sana_block_account(m, "tiny", 256) for m in ("bf16", "coat"))
    total = lambda rows: sum(r.nbytes for r in rows)  # noqa: E731
    assert total(coat) < 0.55 * total(bf16)
    conv_inputs = [r for r in coat if r.nbytes and r.module.startswith("mlp") and r.dtype == torch.bfloat16]
    assert not conv_inputs, conv_inputs


def test_siglip_layer_saves_fp8_norm_inputs_and_no_attention_output_copy():
    """NVILA's SigLIP layer (so400m's ratios at a small width): its LayerNorms (a subclass of nn.LayerNorm) are FP8
    blocks, out_proj keeps SDPA's output instead of a copy; about 0.68x of BF16's bytes (so400m at 729 tokens:
    20.96 against 31.01 B per token and channel)."""
    from scaleforge import fp8 as coat
    from scaleforge.models.nvila.siglip import SiglipConfig, SiglipEncoderLayer

    mod = _script()
    cfg = SiglipConfig(hidden_size=128, intermediate_size=480, num_heads=2)
    totals = {}
    for m in ("bf16", "coat"):
        torch.manual_seed(0)
        layer = SiglipEncoderLayer(cfg).to(torch.bfloat16)
        if m == "coat":
            assert coat.convert_to_coat(layer)["fp8_blocks"] == 4  # two norms, attention, MLP
        x = torch.randn(1, 64, 128, dtype=torch.bfloat16, requires_grad=True)
        rows = mod.account(layer, x, ())
        totals[m] = sum(r.nbytes for r in rows)
    assert not [r for r in rows if r.nbytes and r.module.startswith("layer_norm") and r.dtype == torch.bfloat16]
    assert not [r for r in rows if r.nbytes and r.module == "self_attn.out_proj"]
    assert totals["coat"] < 0.72 * totals["bf16"]
