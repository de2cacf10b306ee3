"""model.kernels=triton in the LLM (fused RMSNorm, SwiGLU, chunked linear + cross-entropy; the Triton CPU
interpreter in fp32 here) gives the loss and every gradient of model.kernels=torch."""
import pytest
import torch

from scaleforge.models.llm.data import IGNORE_INDEX
from scaleforge.models.llm.model import LLMModelConfig, Transformer
from scaleforge.models.llm.recipe import LLMRecipe
from tests.kernels._kernel_testing import needs_triton, rel_err

pytestmark = needs_triton


def _loss_and_grads(kernels: str, batch):
    cfg = LLMModelConfig(preset="tiny", n_layers=1, vocab_size=96, dim=64, n_heads=4, n_kv_heads=2,
                         ffn_hidden=96, seq_len=24, kernels=kernels)
    recipe = LLMRecipe(cfg, job_cfg=None)
    torch.manual_seed(0)
    model = recipe.build_model(torch.device("cpu"))
    model.init_weights()
    with torch.no_grad():  # non-trivial norm weights, so their gradients are checked too
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    loss = recipe.forward_loss(model, batch).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}, model


def test_llm_triton_kernels_match_torch_loss_and_gradients():
    ids = torch.randint(0, 96, (2, 24))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    loss_t, grads_t, model = _loss_and_grads("triton", batch)
    loss_r, grads_r, _ = _loss_and_grads("torch", batch)
    assert isinstance(model.output, torch.nn.Linear) and model.output.kernels == "triton"
    assert rel_err(loss_t, loss_r) < 1e-5
    for name, g in grads_r.items():
        assert rel_err(grads_t[name], g) < 1e-4, name


def test_nvila_kernel_switch_reaches_the_vision_tower_and_the_llm():
    """model.kernels=triton in NVILA: the SigLIP LayerNorms, the LLM and the loss use the kernels and give the
    loss and gradients of model.kernels=torch; the old key names the new one."""


    from scaleforge.models.nvila.config import NVILAConfig
    from scaleforge.models.nvila.model import NVILAModel
    from scaleforge.models.nvila.siglip import SiglipConfig
    from scaleforge.platform.config import ConfigError

    def run(kernels: str):
        cfg = NVILAConfig(vision=SiglipConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                                              patch_size=8, image_size=16, select_layer=-1),
                          llm=LLMModelConfig(preset="tiny", n_layers=1, vocab_size=64), projector="mlp2x_gelu",
                          image_mode="single", kernels=kernels, loss_chunk=5)
        torch.manual_seed(0)
        model = NVILAModel(cfg)
        model.init_weights()
        n_vis = 4  # (16 / 8)^2 patches, one tile
        ids = torch.randint(0, 60, (1, 12))
        ids[0, 2:2 + n_vis] = 63
        loss, _ = model(ids, 63, labels=ids.clone(), pixel_values=torch.randn(1, 3, 16, 16),
                        media_kind=torch.zeros(1, dtype=torch.long), media_tiles=torch.ones(1, dtype=torch.long),
                        media_grid=torch.ones(1, 2, dtype=torch.long))
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, model

    loss_t, grads_t, model = run("triton")
    loss_r, grads_r, _ = run("torch")
    assert model.llm.cfg.kernels == "triton" and model.vision_tower.encoder.layers[0].layer_norm1.kernels == "triton"
    assert rel_err(loss_t, loss_r) < 1e-5
    assert grads_t.keys() == grads_r.keys()
    for name, g in grads_r.items():  # (the key biases' gradient is zero up to rounding: absolute check)
        assert rel_err(grads_t[name], g) < 1e-4 or (grads_t[name] - g).abs().max() < 1e-6, name
    with pytest.raises(ConfigError, match="model.llm.kernels=flex: .* model.llm.attention"):
        NVILAConfig(llm=LLMModelConfig(kernels="flex")).validate()
    with pytest.raises(ConfigError, match="model.llm.kernels=triton: NVILA's kernel switch is model.kernels"):
        NVILAConfig(llm=LLMModelConfig(kernels="triton")).validate()


def test_block_elementwise_kernels_give_way_to_inductor_inside_compile(monkeypatch):
    """model.kernels=triton: eager, the block's norms and SwiGLU call the fused kernels (custom ops); inside
    torch.compile the graph holds the torch code instead (Inductor fuses it; the ops would be opaque), with the
    same outputs."""
    from scaleforge.models.llm.model import TransformerBlock

    cfg = LLMModelConfig(preset="tiny", n_layers=1, vocab_size=96, dim=64, n_heads=4, n_kv_heads=2,
                         ffn_hidden=96, seq_len=16, kernels="triton").resolved()
    torch.manual_seed(0)
    block = TransformerBlock(cfg, 0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 16, 64)
    pos = torch.arange(16).expand(2, 16)
    from scaleforge.models.llm.model import AttentionMask, rope_cos_sin, rope_inv_freq

    cos, sin = rope_cos_sin(rope_inv_freq(cfg), pos, x.dtype)
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    import scaleforge.kernels as kernels

    calls = []
    for name in ("rms_norm", "swiglu"):  # count the calls, run the real kernels
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, __fn=fn, __n=name, **k: calls.append(__n) or __fn(*a, **k))
    eager = block(x, cos, sin, AttentionMask())
    assert sorted(calls) == ["rms_norm", "rms_norm", "swiglu"]
    monkeypatch.undo()
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=record)(x, cos, sin, AttentionMask())
    torch._dynamo.reset()
    assert targets and not any("scaleforge" in t for t in targets), targets
    assert any("rsqrt" in t for t in targets) and any("silu" in t for t in targets)
    assert rel_err(compiled, eager) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's RMSNorm needs CUDA")
def test_llm_rms_norm_runs_liger_eager_on_gpu_and_matches_the_torch_code():
    pytest.importorskip("liger_kernel")
    from scaleforge.models.llm.model import RMSNorm

    x = torch.randn(4, 512, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fused, ref = RMSNorm(2048, 1e-5, "triton").cuda(), RMSNorm(2048, 1e-5, "torch").cuda()
    with torch.no_grad():
        fused.weight.normal_(1.0, 0.1)
        ref.weight.copy_(fused.weight)
    fused.bfloat16(), ref.bfloat16()
    with torch.profiler.profile() as prof:
        y = fused(x)
    assert any("rms_norm" in e.name and "scaleforge" not in e.name for e in prof.events())
    x2 = x.detach().clone().requires_grad_()
    y_ref = ref(x2)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert rel_err(y, y_ref) < 1e-2 and rel_err(x.grad, x2.grad) < 1e-2
    assert rel_err(fused.weight.grad, ref.weight.grad) < 1e-2
