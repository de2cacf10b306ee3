"""Parity of the llm recipe's Transformer with transformers' Qwen2ForCausalLM / LlamaForCausalLM, and
the HF import / export round trip (single-file and sharded safetensors, FSDP2-sharded loading)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from scaleforge.models.llm import from_pretrained, save_pretrained  # noqa: E402
from scaleforge.models.llm.hf import export_hf, read_hf_config  # noqa: E402

torch.set_num_threads(1)

VOCAB = 96
CASES = {
    # Qwen2: q/k/v biases, GQA 4/2, untied and tied embeddings.
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    # Llama: GQA 4/1, head_dim (32) != hidden/heads (16), Llama-3.1 RoPE scaling.
    "llama-llama3rope": ("llama", dict(num_key_value_heads=1, head_dim=32, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama-plain": ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
}


def _hf_model(arch: str, extra: dict, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=256)
    common.update(extra)
    if arch == "qwen2":
        common.setdefault("rope_parameters", dict(rope_type="default", rope_theta=1000000.0))
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    # Randomize everything (HF zero-inits biases and one-inits norms), so every tensor matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_dir(request, tmp_path_factory):
    arch, extra = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    model = _hf_model(arch, extra)
    model.save_pretrained(d)
    return d, arch, model


def test_logits_match_hf_and_back(hf_dir, tmp_path):
    d, arch, ref = hf_dir
    ours = from_pretrained(d).eval()
    assert ours.cfg.qkv_bias == (arch == "qwen2")
    assert ours.cfg.tied_embeddings == ref.config.tie_word_embeddings
    if ours.cfg.tied_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-5

    # back: ours -> HF layout -> transformers
    out = tmp_path / "export"
    save_pretrained(ours, out, arch=arch)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        assert _rel(back(ids).logits, want) < 1e-5

    # key sets and tensors survive the round trip exactly
    with safe_open(str(d / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_sharded_export_loads_in_transformers_and_ours(tmp_path):
    ref = _hf_model("qwen2", dict(tie_word_embeddings=False), seed=3)
    ref.save_pretrained(tmp_path / "src")
    ours = from_pretrained(tmp_path / "src")
    files = save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=60_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        want = ref(ids).logits
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
        assert _rel(back(ids).logits, want) < 1e-5
        assert _rel(from_pretrained(tmp_path / "sharded")(ids), want) < 1e-5


def test_export_hf_from_state_dict_in_bf16(tmp_path):
    ref = _hf_model("llama", {}, seed=4)
    ref.save_pretrained(tmp_path / "src")
    ours = from_pretrained(tmp_path / "src")
    export_hf(ours.state_dict(), ours.cfg, tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, ours.layers[0].attention.wq.weight.detach().bfloat16())
    loaded = from_pretrained(tmp_path / "bf16")
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16


def test_legacy_config_json_fields(tmp_path):
    """transformers 4.x config.json: top-level rope_theta / rope_scaling instead of rope_parameters."""
    ref = _hf_model("llama", {}, seed=5)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 1234.0
    cfg["rope_scaling"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_hf_config(tmp_path)["rope_theta"] == 1234.0


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0)), "RoPE type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(model_type="mistral"), "model_type='mistral'"),
])
def test_unsupported_config_is_named(tmp_path, change, message):
    ref = _hf_model("llama", {}, seed=6)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_pretrained(tmp_path)


def test_qwen2_sliding_window_rejected(tmp_path):
    ref = _hf_model("qwen2", {}, seed=7)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding"):
        from_pretrained(tmp_path)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _hf_model("llama", {}, seed=8)
    ref.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    bad = dict(tensors)
    bad.pop("model.layers.1.mlp.up_proj.weight")
    save_file(bad, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj"):
        from_pretrained(tmp_path)
    bad = dict(tensors)
    bad["model.norm.weight"] = torch.ones(7)
    save_file(bad, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(7,\)"):
        from_pretrained(tmp_path)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)
