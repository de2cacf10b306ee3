"""ShardLocalAdamW: torch's AdamW applied to the local shards of DTensor parameters must give the same
numbers as torch's AdamW on the DTensors themselves, bit for bit, and keep its states as DTensors (so
checkpoints reshard); its device-side grad_scale / found_inf (fused) scale and skip like GradScaler."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from scaleforge.platform.optim import ShardLocalAdamW


@pytest.fixture(scope="module")
def mesh():
    from scaleforge.platform.dist import _free_port

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _params(mesh, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 16), (16,), (5, 3, 7)]
    ps = [torch.nn.Parameter(distribute_tensor(torch.randn(s, generator=g), mesh, [Shard(0)])) for s in shapes]
    return ps, [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("fused", [False, True])
def test_local_update_is_bit_identical_to_torch_adamw_on_dtensors(mesh, fused):
    ref_p, grads = _params(mesh, 0)
    our_p, _ = _params(mesh, 0)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused or None)
    ref, ours = torch.optim.AdamW(ref_p, **kw), ShardLocalAdamW(our_p, **kw)
    for step in range(3):
        for ps in (ref_p, our_p):
            for p, g in zip(ps, grads):
                p.grad = distribute_tensor(g * (step + 1), mesh, [Shard(0)])
        ref.step()
        ours.step()
    for a, b in zip(ref_p, our_p):
        assert torch.equal(a.to_local(), b.to_local())
    state = ours.state[our_p[0]]
    assert isinstance(state["exp_avg"], DTensor) and isinstance(state["exp_avg_sq"], DTensor)
    assert torch.equal(state["exp_avg"].to_local(), ref.state[ref_p[0]]["exp_avg"].to_local())


def test_device_grad_scale_and_found_inf(mesh):
    """grad_scale divides the gradients inside the fused update; found_inf=1 skips the step entirely
    (parameters, moments and step count unchanged)."""
    a_p, grads = _params(mesh, 1)
    b_p, _ = _params(mesh, 1)
    kw = dict(lr=1e-2, weight_decay=0.1, fused=True)
    a, b = ShardLocalAdamW(a_p, **kw), ShardLocalAdamW(b_p, **kw)
    for p, q, g in zip(a_p, b_p, grads):
        p.grad = distribute_tensor(g * 0.25, mesh, [Shard(0)])
        q.grad = distribute_tensor(g, mesh, [Shard(0)])
    a.step()
    b.grad_scale, b.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    b.step()
    for p, q in zip(a_p, b_p):
        assert torch.equal(p.to_local(), q.to_local())
    before = [q.to_local().clone() for q in b_p]
    b.grad_scale, b.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    b.step()
    for q, was in zip(b_p, before):
        assert torch.equal(q.to_local(), was)
    assert float(b.state[b_p[0]]["step"]) == 1.0
