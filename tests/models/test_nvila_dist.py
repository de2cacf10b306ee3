"""Dummy-forward rule under FSDP2 (reference nvila.md §6): 2 gloo processes, only rank 0 has an image.

Rank 1 runs the vision tower and projector on a dummy tile and adds 0 * output to its loss, so both
ranks issue the same all-gathers / reduce-scatters: no hang (collective timeout 60 s), and the
vision-tower gradients equal those of an unsharded model trained on both micro-batches.
"""
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    from scaleforge.models import recipe_config_class
    from scaleforge.models.nvila.data import collate_packed, process_sample, synthetic_sample
    from scaleforge.models.nvila.recipe import NVILARecipe
    from scaleforge.platform.config import load_config

    cfg = load_config(ROOT / "configs/nvila_tiny.yaml", [], recipe_config=recipe_config_class)
    r = NVILARecipe(cfg.model, cfg)
    tok = r.tokenizer
    i = 0
    while not synthetic_sample(r.cfg, 0, i)["images"]:
        i += 1
    with_image = synthetic_sample(r.cfg, 0, i)
    text_only = {"images": [], "conversations": [{"from": "human", "value": "What is 2 plus 2?"},
                                                 {"from": "gpt", "value": "2 plus 2 is 4."}]}
    batches = [collate_packed([process_sample(s, r.cfg, tok)], tok.pad_id) for s in (with_image, text_only)]
    torch.manual_seed(0)
    model = r.build_model(torch.device("cpu"))
    r.init_weights(model)
    return r, model, batches


def _worker(rank, world, port, out_dir):
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        r, model, batches = _setup()
        plan = r.parallel_plan(model)
        for prefix in plan.frozen:
            dict(model.named_modules())[prefix].requires_grad_(False)
        for unit in plan.fsdp_units:
            fully_shard(unit)
        fully_shard(model)
        out = r.forward_loss(model, batches[rank])
        out.loss.backward()
        grads = {}
        for name, p in model.vision_tower.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.full_tensor()
        proj = {n: p.grad.full_tensor() for n, p in model.mm_projector.named_parameters()}
        if rank == 0:
            torch.save({"vision": grads, "proj": proj}, os.path.join(out_dir, "grads.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        Path(out_dir, f"error_{rank}.txt").write_text(traceback.format_exc())
        raise
    from scaleforge.platform.dist import exit_process

    exit_process(0)  # done: no interpreter finalization, where gloo can abort the process (see exit_process)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rank_without_images_runs_dummy_forward_under_fsdp2(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rk, 2, port, str(tmp_path))) for rk in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=200)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in tmp_path.glob("error_*.txt")]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = torch.load(tmp_path / "grads.pt")

    # reference: the unsharded model on both micro-batches; FSDP averages gradients over the 2 ranks
    torch.set_num_threads(1)
    r, model, batches = _setup()
    plan = r.parallel_plan(model)
    for prefix in plan.frozen:
        dict(model.named_modules())[prefix].requires_grad_(False)
    loss = r.forward_loss(model, batches[0]).loss + r.forward_loss(model, batches[1]).loss
    loss.backward()
    ref = {n: p.grad / 2 for n, p in model.vision_tower.named_parameters() if p.grad is not None}
    assert set(got["vision"]) == set(ref) and len(ref) > 0
    for n, g in ref.items():
        assert g.norm() > 0, n
        assert ((got["vision"][n] - g).norm() / g.norm()).item() < 1e-5, n
    for n, p in model.mm_projector.named_parameters():
        g = p.grad / 2
        assert ((got["proj"][n] - g).norm() / g.norm()).item() < 1e-5, n
