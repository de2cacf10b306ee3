"""The llm recipe's Transformer (packing, KV cache, meta init) and recipe (config, data, loss, FLOPs)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from scaleforge.models.llm.data import SyntheticTokenStream, markov_entropy
from scaleforge.models.llm.model import (
    LLMModelConfig,
    Transformer,
    document_causal_mask,
    positions_from_document_ids,
)
from scaleforge.models.llm.recipe import LLMRecipe
from scaleforge.platform.config import ConfigError, DataConfig
from scaleforge.platform.recipe import DataContext

torch.set_num_threads(1)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(LLMModelConfig(preset="tiny", **kw).resolved())
    m.init_weights()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


# --- packed sequences -------------------------------------------------------------------------------
def test_document_mask_reference():
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = document_causal_mask(docs)[0, 0]
    want = torch.zeros(6, 6, dtype=torch.bool)
    for q, k in [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3), (4, 2), (4, 3), (4, 4), (5, 5)]:
        want[q, k] = True
    assert torch.equal(mask, want)
    assert positions_from_document_ids(docs).tolist() == [[0, 1, 0, 1, 2, 0]]


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_row_equals_separate_samples(attention):
    model = _model(attention=attention)
    torch.manual_seed(1)
    lengths = [7, 12, 5]
    samples = [torch.randint(0, 256, (1, n)) for n in lengths]
    packed = torch.cat(samples, dim=1)
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        separate = torch.cat([model(s) for s in samples], dim=1)
        by_docs = model(packed, document_ids=docs)
        cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
        by_cu = model(packed, cu_seqlens=cu)
        unmasked = model(packed)
    assert _rel(by_docs, separate) < 1e-5
    assert _rel(by_cu, separate) < 1e-5
    # without the mask the later samples see earlier ones: the check above is not vacuous
    assert _rel(unmasked[:, 7:], separate[:, 7:]) > 1e-2


def test_packed_backward_matches_separate():
    model = _model()
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 6))
    docs = torch.tensor([[0] * 9 + [1] * 6])
    model.zero_grad()
    model(torch.cat([a, b], 1), document_ids=docs).square().sum().backward()
    g_packed = model.layers[0].attention.wk.weight.grad.clone()
    model.zero_grad()
    (model(a).square().sum() + model(b).square().sum()).backward()
    assert _rel(g_packed, model.layers[0].attention.wk.weight.grad) < 1e-5


# --- generation -------------------------------------------------------------------------------------
def test_kv_cache_generation_equals_no_cache():
    model = _model(seed=2)
    prompt = torch.randint(0, 256, (3, 11))
    cached = model.generate(prompt, max_new_tokens=12)
    plain = model.generate(prompt, max_new_tokens=12, use_cache=False)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, plain)
    # and the cached logits themselves match a full forward
    cache = model.new_cache(3, 30)
    with torch.no_grad():
        model(prompt[:, :6], cache=cache)
        step = model(prompt[:, 6:], cache=cache)
        full = model(prompt)
    assert _rel(step, full[:, 6:]) < 1e-5


def test_generation_from_inputs_embeds():
    """NVILA path: the prompt is an embedding sequence (e.g. with visual tokens spliced in)."""
    model = _model(seed=3)
    prompt = torch.randint(0, 256, (2, 8))
    embeds = model.tok_embeddings(prompt).detach()
    embeds[:, 2:4] = torch.randn(2, 2, embeds.shape[-1])  # "visual" tokens with no token id
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=model.tok_embeddings(prompt)), model(prompt))
    a = model.generate(inputs_embeds=embeds, max_new_tokens=6)
    b = model.generate(inputs_embeds=embeds, max_new_tokens=6, use_cache=False)
    assert torch.equal(a, b)


# --- initialization ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_meta_build_to_empty_init_weights(tied):
    def build(seed):
        recipe = LLMRecipe(LLMModelConfig(preset="tiny", tied_embeddings=tied), None)
        with torch.device("meta"):
            m = recipe.build_model(torch.device("meta"))
        assert all(p.is_meta for p in m.parameters())
        m.to_empty(device="cpu")
        torch.manual_seed(seed)
        recipe.init_weights(m)
        return m

    a, b, c = build(0), build(0), build(1)
    assert (a.output.weight is a.tok_embeddings.weight) == tied
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k in sa:
        assert torch.isfinite(sa[k]).all(), k
        assert torch.equal(sa[k], sb[k]), k
    w = "layers.1.feed_forward.w2.weight"
    assert not torch.equal(sa[w], sc[w])
    assert abs(sa[w].std().item() - 0.02) < 0.002
    assert torch.equal(sa["norm.weight"], torch.ones_like(sa["norm.weight"]))
    assert torch.equal(sa["layers.0.attention.wq.bias"], torch.zeros_like(sa["layers.0.attention.wq.bias"]))
    ids = torch.randint(0, 256, (1, 5))
    assert torch.isfinite(a(ids)).all()


# --- config -----------------------------------------------------------------------------------------
def test_config_presets_and_overrides():
    from scaleforge.models import recipe_config_class
    from scaleforge.platform.config import load_config

    cfg = load_config(None, ["model.recipe=llm", "model.preset=tiny", "model.dim=64", "model.n_layers=3"],
                      recipe_config=recipe_config_class)
    assert isinstance(cfg.model, LLMModelConfig)
    r = cfg.model.resolved()
    assert (r.dim, r.n_layers, r.vocab_size, r.head_dim) == (64, 3, 256, 16)
    with pytest.raises(ConfigError, match="model.preset.*did you mean llama3-8b"):
        LLMModelConfig(preset="llama3-7b").resolved()
    with pytest.raises(ConfigError, match="model.n_kv_heads"):
        LLMModelConfig(preset="tiny", n_kv_heads=3).resolved()
    with pytest.raises(ConfigError, match="model.vocab_size: required"):
        LLMModelConfig(preset=None, dim=64).resolved()
    with pytest.raises(ConfigError, match="model.kernels: 'cuda'"):
        LLMModelConfig(kernels="cuda").resolved()
    with pytest.raises(ConfigError, match="model.attention: 'triton'"):
        LLMModelConfig(attention="triton").resolved()
    # the old meaning of model.kernels (the attention implementation) names the key it moved to
    with pytest.raises(ConfigError, match=r"model.kernels=flex: .* kernel library .* is model.attention"):
        LLMModelConfig(kernels="flex").resolved()


def test_flops_and_param_counts_of_presets():
    """Llama-3-8B: 8.03B parameters and 57.9 GFLOP/token at seq 8192 (reference/platforms.md section 2);
    Qwen2.5-7B: 7.62B; our 1b preset: ~1.03B, ~6.35 GFLOP/token at 2048 (platforms.md section 3: ~6.4)."""
    expect = {"llama3-8b": (8.03e9, 57.9e9), "qwen2.5-7b": (7.62e9, None), "1b": (1.03e9, 6.35e9)}
    for preset, (params, flops_tok) in expect.items():
        r = LLMRecipe(LLMModelConfig(preset=preset), None)
        with torch.device("meta"):
            m = r.build_model(torch.device("meta"))
        assert r.describe(m)["parameters"] == m.num_params()
        assert abs(m.num_params() - params) / params < 0.005, preset
        if flops_tok:
            assert abs(r.flops_per_sample() / r.cfg.seq_len - flops_tok) / flops_tok < 0.005, preset
    r = LLMRecipe(LLMModelConfig(preset="tiny"), None)
    c = r.cfg
    n = Transformer(c).num_params(exclude_embedding=True)
    assert r.flops_per_sample() == 6 * n * c.seq_len + 12 * c.n_layers * c.n_heads * c.head_dim * c.seq_len**2


# --- data -------------------------------------------------------------------------------------------
def _stream(rank=0, world=1, batch=2, seed=5, n=50):
    return SyntheticTokenStream(256, 33, batch, seed, rank, world, n)


def test_synthetic_stream_is_deterministic_sharded_and_resumable():
    a, b = _stream(), _stream()
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], x["input_ids"])
    assert not torch.equal(next(_stream(seed=6))["input_ids"], next(_stream())["input_ids"])
    # ranks take interleaved samples of the single global stream, across an epoch boundary (n=50)
    single = torch.cat([next(_stream(batch=60))["input_ids"]])
    r0, r1 = _stream(0, 2, batch=30), _stream(1, 2, batch=30)
    assert torch.equal(next(r0)["input_ids"], single[0::2]) and torch.equal(next(r1)["input_ids"], single[1::2])
    assert not torch.equal(single[0], single[50])  # epoch 1 differs from epoch 0
    # exact resume
    s = _stream()
    next(s)
    state = s.state_dict()
    want = [next(s)["input_ids"] for _ in range(3)]
    t = _stream()
    t.load_state_dict(state)
    assert all(torch.equal(next(t)["input_ids"], w) for w in want)
    # resume 2 ranks -> 3 ranks continues at the first unconsumed global sample
    old = [_stream(r, 2) for r in range(2)]
    for it in old:
        next(it), next(it)  # 8 samples consumed in total
    new = [_stream(r, 3, batch=1) for r in range(3)]
    for it in new:
        it.load_resharded_state_dict([o.state_dict() for o in old])
    got = torch.cat([next(it)["input_ids"] for it in new])
    assert torch.equal(got, next(_stream(batch=11))["input_ids"][8:11])


def _job(data_kind="synthetic"):
    @dataclasses.dataclass
    class Job:
        data: DataConfig

    return Job(DataConfig(kind=data_kind, synthetic_samples=1000))


def test_forward_loss_is_summed_token_ce():
    recipe = LLMRecipe(LLMModelConfig(preset="tiny"), _job())
    model = _model()
    ids = torch.randint(0, 256, (2, 10))
    labels = ids.clone()
    labels[0, 4:] = -100
    out = recipe.forward_loss(model, {"input_ids": ids, "labels": labels})
    logits = model(ids)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), reduction="sum")
    assert out.num_items == 9 + 3 and out.num_tokens == 20
    assert torch.allclose(out.loss, want, rtol=1e-5)


def test_tiny_model_learns_synthetic_language():
    """Loss starts near ln(256) = 5.5 and falls visibly within 40 steps (floor: 0.93 nats)."""
    torch.manual_seed(0)
    recipe = LLMRecipe(LLMModelConfig(preset="tiny", seq_len=64), _job())
    model = recipe.build_model(torch.device("cpu"))
    recipe.init_weights(model)
    data = recipe.build_data(DataContext(0, 1, 8, seed=0, device=torch.device("cpu")))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = recipe.forward_loss(model, next(data))
        loss = out.loss / out.num_items
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - 5.55) < 0.3
    assert losses[-1] < losses[0] - 1.5 and losses[-1] > markov_entropy()


def test_unknown_data_kind_is_a_config_error():
    recipe = LLMRecipe(LLMModelConfig(preset="tiny"), _job("parquet"))
    with pytest.raises(ConfigError, match="data.kind"):
        recipe.build_data(DataContext(0, 1, 2, seed=0, device=torch.device("cpu")))


def test_export_through_recipe(tmp_path):
    recipe = LLMRecipe(LLMModelConfig(preset="tiny"), _job())
    assert recipe.export_formats() == ("hf",)
    model = _model()
    recipe.export(model.state_dict(), str(tmp_path), "hf")
    from scaleforge.models.llm import from_pretrained

    back = from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    with pytest.raises(NotImplementedError):
        recipe.export(model.state_dict(), str(tmp_path), "gguf")


# --- webdataset token shards (the platform loader, real tars) -----------------------------------
def _wds_job(tmp_path, vocab=256):
    from scaleforge.platform.data.config import DataSourceConfig
    from scaleforge.platform.data.tools import synth

    synth("tokens", str(tmp_path / "tok"), n=30, per_shard=10, seq_len=21, vocab=vocab)
    job = _job("webdataset")
    job.data.sources = [DataSourceConfig(name="tok", shards=[str(tmp_path / "tok" / "shard-{000000..000002}.tar")])]
    job.data.shuffle_buffer = 1
    return job


def test_webdataset_packed_batches_give_per_sample_loss(tmp_path):
    """Token shards packed into rows of seq_len: the summed loss equals the sum of each sample's own
    loss (attention and labels never cross samples), and our mask agrees with the loader's."""
    from scaleforge.platform.data import packed_attention_mask

    recipe = LLMRecipe(LLMModelConfig(preset="tiny", seq_len=64), _wds_job(tmp_path))
    data = recipe.build_data(DataContext(0, 1, 2, seed=0, device=torch.device("cpu")))
    try:
        batch = next(data)
    finally:
        data.close()
    assert batch["input_ids"].shape == (2, 64)
    seq_ids = batch["seq_ids"]
    real = seq_ids >= 0
    assert torch.equal(document_causal_mask(seq_ids) & real[:, None, :, None],
                       packed_attention_mask(seq_ids) & real[:, None, :, None])
    model = _model(seed=4)
    with torch.no_grad():
        out = recipe.forward_loss(model, batch)
        want, count = torch.zeros(()), 0
        for r in range(2):
            for s in seq_ids[r].unique():
                if s < 0:
                    continue
                ids = batch["input_ids"][r][seq_ids[r] == s][None]
                logits = model(ids)
                want += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
                count += ids.shape[1] - 1
    assert int(out.num_items) == count and count == 2 * 3 * 20  # 3 samples of 21 tokens per row
    assert torch.allclose(out.loss, want, rtol=1e-5)


def test_webdataset_token_ids_beyond_vocab_are_named(tmp_path):
    recipe = LLMRecipe(LLMModelConfig(preset="tiny", vocab_size=100), _wds_job(tmp_path, vocab=256))
    from scaleforge.models.llm.data import VocabularyError

    with pytest.raises(VocabularyError, match="model.vocab_size=100"):
        data = recipe.build_data(DataContext(0, 1, 2, seed=0, device=torch.device("cpu")))
        next(data)


def test_activation_estimate_counts_what_compiled_blocks_save():
    """parallel.compile: the probe partitions the blocks and the loss as Inductor does, which keeps fewer
    intermediates (fused RMSNorm / SwiGLU / log-softmax) than eager autograd; both scale with the batch."""
    recipe = LLMRecipe(LLMModelConfig(preset="tiny", seq_len=128), None)
    eager = recipe.activation_bytes(2, activation_checkpointing=False)
    compiled = recipe.activation_bytes(2, activation_checkpointing=False, compiled=True)
    assert 0 < compiled < 0.9 * eager
    assert recipe.activation_bytes(4, False, compiled=True) == pytest.approx(2 * compiled, rel=0.02)


def test_activation_estimate_counts_what_coat_saves():
    """parallel.fp8=coat: the probe model is converted as the engine converts it, so the estimate counts the
    FP8-saved norm / SwiGLU inputs and shared linear inputs (tiny: 0.56x of bf16's, logits included)."""
    recipe = LLMRecipe(LLMModelConfig(preset="tiny", seq_len=128), None)
    eager = recipe.activation_bytes(2, activation_checkpointing=False)
    coat = recipe.activation_bytes(2, activation_checkpointing=False, fp8="coat")
    assert 0.4 * eager < coat < 0.65 * eager
    assert recipe.activation_fp8_modes == ("coat",)


def test_dry_run_total_counts_gradients_and_activations_together_only_with_accumulation():
    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import derive_layout, load_config
    from scaleforge.platform.plan import make_plan

    def plan(accum: int):
        cfg = load_config("lm_tiny.yaml", [f"trainer.global_batch_size={4 * accum}", "trainer.micro_batch_size=4"],
                          recipe_config=recipe_config_class)
        recipe = get_recipe_class("llm")(cfg.model, cfg)
        return make_plan(cfg, derive_layout(cfg, 1), recipe).memory

    one, two = plan(1), plan(2)
    static = sum(v for k, v in one.items() if k not in ("total", "grads (fp32)", "activations"))
    assert one["total"] == pytest.approx(static + max(one["grads (fp32)"], one["activations"]))
    assert two["total"] == pytest.approx(static + two["grads (fp32)"] + two["activations"])


def test_dry_run_counts_the_ema_shadow():
    """optim.ema_decay > 0 keeps an fp32 shadow of every trainable parameter: the plan counts it (as many bytes
    as the fp32 gradients) and the total grows by it; without an EMA there is no such line."""
    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import derive_layout, load_config
    from scaleforge.platform.plan import make_plan

    def plan(decay: float):
        cfg = load_config("lm_tiny.yaml", [f"optim.ema_decay={decay}"], recipe_config=recipe_config_class)
        return make_plan(cfg, derive_layout(cfg, 2), get_recipe_class("llm")(cfg.model, cfg))

    without, with_ema = plan(0.0), plan(0.999)
    assert "ema (fp32)" not in without.memory
    assert with_ema.memory["ema (fp32)"] == pytest.approx(with_ema.memory["grads (fp32)"], rel=1e-9)
    assert with_ema.memory["total"] - without.memory["total"] == pytest.approx(with_ema.memory["ema (fp32)"])


def test_dry_run_counts_fsdp_groups_in_flight():
    """parallel.fsdp_group_size=k: the plan holds two groups of k units unsharded (plus one group's
    unsharded gradients), so the 'unsharded units' term grows k-fold for equal blocks."""
    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import derive_layout, load_config
    from scaleforge.platform.plan import make_plan

    def unsharded(k: int) -> float:
        cfg = load_config("lm_tiny.yaml", ["model.n_layers=8", "model.tied_embeddings=true",
                                           f"parallel.fsdp_group_size={k}"], recipe_config=recipe_config_class)
        recipe = get_recipe_class("llm")(cfg.model, cfg)
        return make_plan(cfg, derive_layout(cfg, 2), recipe).memory["unsharded units"]

    c = LLMModelConfig(preset="tiny").resolved()
    root = 4 * (c.vocab_size * c.dim + c.dim) / 2**30  # tied embedding + final norm, fp32 (lm_tiny)
    one, four = unsharded(1) - root, unsharded(4) - root
    assert four == pytest.approx(4 * one, rel=1e-6)
