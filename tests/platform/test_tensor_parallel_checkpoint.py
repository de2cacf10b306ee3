"""parallel.tp checkpoints reshard between tp sizes through DCP, and export gathers the tp slices.

Megatron's layers hold plain tensors with the rank's slice; what the engine checkpoints and exports is
built by ``TensorParallel`` from those slices after FSDP2 has sharded them over the data-parallel mesh.
These gloo workers hold the same slices in plain ``nn.Linear`` modules (megatron-core needs CUDA), so
the real FSDP2 / DTensor / DCP path runs: save at tp=2 x dp=2, load at tp=1 x dp=2 and at tp=2 x dp=1;
parameters and AdamW states must equal a single-process reference bit for bit. And the gradients of
parameters that see only the rank's tokens (norm weights) are summed over tp, exactly under accumulation.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

SPLIT = {"col.weight": 0, "col.bias": 0, "row.weight": 1}  # column-parallel, row-parallel; norm replicated


class Tiny(nn.Module):
    def __init__(self, tp: int):
        super().__init__()
        self.col = nn.Linear(8, 12 // tp)
        self.row = nn.Linear(12 // tp, 8, bias=False)
        self.norm = nn.Parameter(torch.ones(8))


def _reference() -> tuple[dict, dict, dict]:
    """Full weights, full gradients, and (weights, exp_avg, exp_avg_sq) after one AdamW step."""
    g = torch.Generator().manual_seed(3)
    model = Tiny(1)
    full = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    grads = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    model.load_state_dict(full)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False)
    opt.step()
    after = {n: (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
             for n, p in model.named_parameters()}
    return full, grads, after


def _worker(rank: int, world: int, tp: int, init_file: str, ckpt: str, phase: str, out_file: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from scaleforge.platform.tensor_parallel import TensorParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dp = world // tp
        names = ("dp_shard", "tp") if tp > 1 else ("dp_shard",)
        mesh = init_device_mesh("cpu", (dp, tp) if tp > 1 else (dp,), mesh_dim_names=names)
        dp_mesh = mesh["dp_shard"] if tp > 1 else mesh
        tp_group = mesh["tp"].get_group() if tp > 1 else None
        tpi = TensorParallel(tp_group, tp, rank % tp, dict(SPLIT) if tp > 1 else {}, mesh=mesh)
        model = Tiny(tp)
        fully_shard(model, mesh=dp_mesh)
        tpi.dp_placements = model.col.weight.placements
        full, grads, after = _reference()

        def shard(name, t):
            return distribute_tensor(tpi.local_slice(name, t).contiguous(), dp_mesh, tpi.dp_placements,
                                     src_data_rank=None)

        opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.to_local().copy_(shard(n, full[n]).to_local())
        if phase == "save":
            for n, p in model.named_parameters():
                p.grad = shard(n, grads[n])
            opt.step()
            state = dict(zip(("model", "optim"), get_state_dict(model, opt)))
            dcp.save(tpi.checkpoint_view(state, tpi.to_global), checkpoint_id=ckpt)
            exported = tpi.full_state_dict(model, rank == 0)
        else:
            state = dict(zip(("model", "optim"), get_state_dict(model, opt)))
            if tp > 1:
                state = tpi.checkpoint_view(state, tpi.to_global)
            dcp.load(state, checkpoint_id=ckpt)
            if tp > 1:
                state = tpi.checkpoint_view(state, lambda n, t: tpi.to_local(n, t, dp_mesh))
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            exported = tpi.full_state_dict(model, rank == 0) if tp > 1 else {
                n: t.full_tensor() for n, t in model.state_dict().items()}
        # the loaded (or saved) optimizer states, gathered: each rank checks its own slice
        for n, p in model.named_parameters():
            for i, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
                mine = opt.state[p][key].to_local()
                want = shard(n, after[n][i]).to_local()
                assert torch.equal(mine, want), (phase, tp, rank, n, key)
        if rank == 0:
            torch.save(exported, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    from scaleforge.platform.dist import exit_process

    exit_process(0)


def _spawn(world: int, tp: int, tmp_path, ckpt, phase: str) -> dict:
    import torch.multiprocessing as mp

    init = tmp_path / f"init_{phase}_{tp}"
    out = tmp_path / f"out_{phase}_{tp}.pt"
    mp.start_processes(_worker, args=(world, tp, str(init), str(ckpt), phase, str(out)), nprocs=world,
                       join=True, start_method="spawn")
    return torch.load(out)


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_loads_at_tp1_and_tp2_and_export_gathers(tmp_path):
    ckpt = tmp_path / "ckpt"
    _, _, after = _reference()
    want = {n: w for n, (w, _, _) in after.items()}
    saved = _spawn(4, 2, tmp_path, ckpt, "save")  # dp=2 x tp=2: FSDP and tp both split col.weight's rows
    assert saved.keys() == want.keys()
    for n in want:
        assert torch.equal(saved[n], want[n]), n
    for world, tp in ((2, 1), (2, 2)):  # tp=1 x dp=2, tp=2 x dp=1
        loaded = _spawn(world, tp, tmp_path, ckpt, f"load{tp}")
        for n in want:
            assert torch.equal(loaded[n], want[n]), (tp, n)


def _grad_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    from scaleforge.platform.tensor_parallel import TensorParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.Module()
        model.norm = nn.Parameter(torch.ones(5))  # in the sequence-parallel region: rank's tokens only
        model.tower = nn.Parameter(torch.ones(5))  # upstream of it: the full gradient on every rank
        tpi = TensorParallel(dist.group.WORLD, world, rank, partial_grads={"norm"})
        xs = [torch.arange(5.0) + 10 * r + 100 * mb for mb in range(2) for r in range(world)]
        for mb in range(2):  # two micro-batches: the sum must stay exact under accumulation
            before = tpi.replicated_grads(model)
            ((model.norm * xs[mb * world + rank]).sum() + (model.tower * 7).sum()).backward()
            tpi.sum_replicated_grads(before)
        assert torch.equal(model.norm.grad, sum(xs)), model.norm.grad
        assert torch.equal(model.tower.grad, torch.full((5,), 14.0)), model.tower.grad
        dist.barrier()
    finally:
        dist.destroy_process_group()
    from scaleforge.platform.dist import exit_process

    exit_process(0)


@pytest.mark.slow
def test_norm_gradients_are_summed_over_tp_once_per_micro_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_grad_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True, start_method="spawn")
