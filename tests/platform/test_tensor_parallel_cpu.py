"""parallel.tp on CPU workers (gloo): megatron-core needs CUDA, so there the tp layers are their
torch.distributed equivalents (scaleforge/platform/tensor_parallel_torch.py) with the same seams, plan and
engine code. Two processes at tp = 2 against the plain model in each process, one micro-batch:

- the LLM (lm_tiny, tied embedding and output head: both split over the vocabulary, re-tied) and NVILA
  (nvila_tiny: vision tower and projector replicated over tp, visual tokens merged into the full sequence
  before it is split, the loss from the vocabulary-parallel head called with labels in chunks, rows padded
  to a multiple of tp):
  summed loss, item count and every parameter's gradient (the rank's slice) equal the plain model's within
  fp32 rounding;
- an NVILA run through ``launch`` at tp = 2 trains, checkpoints and exports;
- NVILA's dry-run plan at tp = 2 splits the LLM's activations, not the (replicated) vision tower's.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CASES = (("lm_tiny.yaml", ["model.seq_len=64", "model.tied_embeddings=true"]), ("nvila_tiny.yaml", ["model.loss_chunk=64"]))


def _parity_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import load_config
    from scaleforge.platform.recipe import DataContext
    from scaleforge.platform.tensor_parallel import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for config, overrides in CASES:
            cfg = load_config(config, ["parallel.tp=2", *overrides], recipe_config=recipe_config_class)
            recipe = get_recipe_class(cfg.model.recipe)(cfg.model, cfg)
            torch.manual_seed(0)
            plain = recipe.build_model(torch.device("cpu"))
            recipe.init_weights(plain)
            model = recipe.build_model(torch.device("meta"))
            tp = apply_tensor_parallel(model, recipe.tensor_parallel_plan(model), dist.group.WORLD,
                                       torch.device("meta"), backend="torch")
            model.to_empty(device="cpu")
            model.load_state_dict({k: tp.local_slice(k, v) for k, v in plain.state_dict().items()})
            batch = next(recipe.build_data(DataContext(0, 1, 2, 0, torch.device("cpu"))))
            ref, out = recipe.forward_loss(plain, batch), recipe.forward_loss(model, batch)
            assert int(ref.num_items) == int(out.num_items) > 0, config
            torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0, msg=config)
            ref.loss.backward()
            before = tp.replicated_grads(model)
            out.loss.backward()
            tp.sum_replicated_grads(before)
            want = dict(plain.named_parameters())
            for name, p in model.named_parameters():
                if want[name].grad is None:
                    assert p.grad is None, name
                    continue
                # relative to the tensor's norm; + 1e-6: SigLIP's key biases have gradients of rounding size
                # (the softmax ignores them)
                g = tp.local_slice(name, want[name].grad)
                err = (p.grad - g).norm().item()
                assert err <= 1e-5 * g.norm().item() + 1e-6, (config, name, err, g.norm().item())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    from scaleforge.platform.dist import exit_process

    exit_process(0)


@pytest.mark.slow
def test_tp2_loss_and_gradients_equal_the_plain_model_for_llm_and_nvila(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_parity_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True, start_method="spawn")


@pytest.mark.slow
def test_nvila_trains_checkpoints_and_exports_at_tp2_through_launch(run_env, tmp_path):
    proc = subprocess.run([str(BIN / "launch"), "--config", "nvila_tiny.yaml", "--nproc", "2", "parallel.tp=2",
                           "trainer.max_steps=2", "trainer.global_batch_size=4", f"run.output_dir={tmp_path}",
                           "run.name=tp", "metrics.plot=false"],
                          capture_output=True, text=True, env=run_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x tp=2" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "tp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    assert records[0]["visual_tokens_per_sample"] > 0
    out = tmp_path / "export"
    proc = subprocess.run([str(BIN / "scaleforge"), "export", "--run", str(tmp_path / "tp"), "--format", "hf",
                           "--out", str(out)], capture_output=True, text=True, env=run_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    llm = {k: v for f in (out / "llm").glob("*.safetensors") for k, v in load_file(f).items()}
    assert llm["model.embed_tokens.weight"].shape == (272, 128)  # gathered over tp: the full vocabulary
    assert llm["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)


def test_nvila_plan_at_tp2_splits_the_llm_activations_but_not_the_vision_towers():
    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import derive_layout, load_config
    from scaleforge.platform.plan import make_plan

    act = {}
    for tp in (1, 2):
        cfg = load_config("nvila_tiny.yaml", [f"parallel.tp={tp}"], recipe_config=recipe_config_class)
        plan = make_plan(cfg, derive_layout(cfg, 2), get_recipe_class("nvila")(cfg.model, cfg))
        act[tp] = plan.memory["activations"]
    # the replicated vision tower encodes the same media on every tp rank: more than half of tp = 1's
    assert act[1] / 2 < act[2] < act[1]
