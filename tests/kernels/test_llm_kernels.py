"""model.kernels=triton in the LLM (fused RMSNorm, SwiGLU, chunked linear + cross-entropy; the Triton CPU
interpreter in fp32 here) gives the loss and every gradient of model.kernels=torch."""
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
