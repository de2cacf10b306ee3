"""parallel.tp: megatron-core tensor parallelism of the LM.

CPU: the launcher's checks (arithmetic) and the dry-run plan, through the ``launch`` console script
(CPU training at tp > 1: test_tensor_parallel_cpu.py). GPU (marked gpu): on one GPU, the model with megatron's layers at tp = 1 equals the plain model
exactly; on two GPUs, tp = 2 losses equal tp = 1 within bf16 tolerance (benchmarks/tp_llm.py --check).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaleforge.platform.config import ConfigError, JobConfig, derive_layout

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _launch(run_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "launch"), "--config", "lm_tiny.yaml", *args], capture_output=True,
                          text=True, env=run_env, cwd=REPO, timeout=300)


def _memory(out: str) -> dict[str, float]:
    return {k.strip(): float(v) for k, v in re.findall(r"^\s+(unsharded units|activations)\s+([\d.]+) GiB", out, re.M)}


def test_derive_layout_puts_tp_innermost_and_divides_the_batch_over_data_parallel_ranks():
    cfg = JobConfig()
    cfg.parallel.tp = 2
    cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size = 16, 2
    layout = derive_layout(cfg, 8)
    assert (layout.dp_shard, layout.tp, layout.dp_size, layout.grad_accum) == (4, 2, 4, 2)
    with pytest.raises(ConfigError, match=r"parallel.tp=3 does not divide the world size 8"):
        cfg.parallel.tp = 3
        derive_layout(cfg, 8)
    cfg.parallel.tp, cfg.parallel.compile = 2, True  # blocks of tp layers compile (per block, as at tp = 1)
    assert derive_layout(cfg, 8).tp == 2
    cfg.parallel.compile, cfg.parallel.fp8 = False, "coat"
    with pytest.raises(ConfigError, match=r"parallel.fp8=coat with parallel.tp=2"):
        derive_layout(cfg, 8)


def test_dry_run_shows_the_tp_mesh_and_per_device_memory(run_env):
    lines = {}
    for tp in (1, 2):
        proc = _launch(run_env, "--nproc", "2", f"parallel.tp={tp}", "model.preset=1b", "model.seq_len=2048",
                       "trainer.micro_batch_size=1", "trainer.global_batch_size=2", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        lines[tp] = proc.stdout
    assert "mesh              dp_replicate=1 x dp_shard=1 x tp=2" in lines[2]
    assert "dp_shard=2\n" in lines[1]
    one, two = _memory(lines[1]), _memory(lines[2])
    # tp splits the blocks' matrices and the vocabulary: gathered FSDP units and activations halve
    assert two["unsharded units"] == pytest.approx(one["unsharded units"] / 2, rel=0.02)
    assert two["activations"] == pytest.approx(one["activations"] / 2, rel=0.02)


@pytest.mark.parametrize("nproc, overrides, message", [
    (4, ["parallel.tp=4"], "parallel.tp=4 does not divide layers.0.attention.n_kv_heads (2)"),
    (3, ["parallel.tp=2"], "parallel.tp=2 does not divide the world size 3"),
    (2, ["parallel.tp=2", "model.vocab_size=255"], "does not divide the vocabulary of tok_embeddings"),
    (2, ["parallel.tp=2", "model.seq_len=127"], "does not divide the tokens per row (model.seq_len)"),
])
def test_launch_rejects_what_tp_cannot_split_before_any_worker_starts(run_env, tmp_path, nproc, overrides, message):
    proc = _launch(run_env, "--nproc", str(nproc), *overrides, f"run.output_dir={tmp_path}")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written, no worker started


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------
def _single_rank_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29571")
        dist.init_process_group("nccl", rank=0, world_size=1)
    return dist.group.WORLD


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="megatron-core needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp1_megatron_layers_equal_the_plain_model_exactly(dtype):
    pytest.importorskip("megatron.core")
    from scaleforge.models.llm.model import LLMModelConfig, Transformer
    from scaleforge.models.llm.recipe import summed_cross_entropy
    from scaleforge.platform.tensor_parallel import apply_tensor_parallel, vocab_parallel_summed_cross_entropy

    cfg = LLMModelConfig(preset="tiny", qkv_bias=False).resolved()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    plain = Transformer(cfg).to(dev)
    plain.init_weights()
    with torch.device("meta"):
        tp_model = Transformer(cfg)
    from scaleforge.models.llm.recipe import LLMRecipe

    plan = LLMRecipe(cfg, JobConfig()).tensor_parallel_plan(tp_model)
    group = _single_rank_group()
    tp = apply_tensor_parallel(tp_model, plan, group, torch.device("meta"))
    tp_model.to_empty(device=dev)
    tp_model.load_state_dict(plain.state_dict())  # same names, no extra state
    assert set(tp.split_dims) >= {"layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight",
                                  "tok_embeddings.weight", "output.weight"}
    plain, tp_model = plain.to(dtype), tp_model.to(dtype)

    ids = torch.randint(0, cfg.vocab_size, (2, 64), device=dev)
    logits_plain, logits_tp = plain(ids), tp_model(ids)
    assert torch.equal(logits_plain, logits_tp)
    upstream = torch.randn_like(logits_plain)
    (logits_plain * upstream).sum().backward()
    (logits_tp * upstream).sum().backward()
    grads = dict(tp_model.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    # megatron's cross-entropy (max-subtracted log-sum-exp over vocabulary slices) against F.cross_entropy
    ref = summed_cross_entropy(logits_plain.detach(), ids)
    ours = vocab_parallel_summed_cross_entropy(logits_tp.detach(), ids, group)
    assert torch.allclose(ours, ref, rtol=1e-5), (ours, ref)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_losses_equal_tp1_within_bf16_tolerance(run_env):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tp_llm.py"), "--check", "--steps", "20"],
                          capture_output=True, text=True, env=run_env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
