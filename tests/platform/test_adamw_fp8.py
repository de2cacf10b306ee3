"""adamw_fp8 (COAT's FP8 AdamW): close to torch's AdamW, exact where its moments stay fp32, resumable bit for
bit from its state dict, and as small as the dry-run plan says."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from scaleforge.platform.optim import optimizer_state_bytes
from scaleforge.platform.optim.adamw_fp8 import AdamWFP8, state_bytes

KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SHAPES = [(37, 300), (16,), (5, 3, 7), (1, 129)]


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    # gradients of very different magnitudes per row: the range expansion has work to do
    return [torch.randn(s, generator=g) * torch.logspace(-6, 0, s[0]).reshape(-1, *[1] * (len(s) - 1))
            for s in SHAPES]


def _run(opt, params, steps, start=0):
    for i in range(start, start + steps):
        for p, g in zip(params, _grads(i)):
            p.grad = g
        opt.step()


def test_close_to_adamw_and_exact_for_1d():
    """FP8 E4M3 moments (3 mantissa bits, ~2^-4 relative rounding of the expanded value) perturb each update
    by a few percent; over 20 steps the total parameter change stays within 5% (relative, Frobenius) of
    fp32 AdamW's. 1-D parameters keep fp32 moments: torch's AdamW bit for bit."""
    ref_p, our_p = _params(0), _params(0)
    ref, ours = torch.optim.AdamW(ref_p, foreach=False, **KW), AdamWFP8(our_p, **KW)
    _run(ref, ref_p, 20)
    _run(ours, our_p, 20)
    init = _params(0)
    for r, o, p0 in zip(ref_p, our_p, init):
        if r.ndim == 1:
            assert torch.equal(r, o)
            continue
        dr, do = r.detach() - p0, o.detach() - p0
        rel = (dr - do).norm() / dr.norm()
        assert 0 < rel < 0.05, rel
    st = ours.state[our_p[0]]
    assert st["exp_avg_q"].dtype == torch.float8_e4m3fn and st["exp_avg_q"].shape == (37, 384)


def test_row_chunks_give_the_whole_parameter_update(monkeypatch):
    """The update runs on bounded row chunks (its fp32 temporaries stay small for an embedding-sized
    parameter); groups follow rows, so chunks of 4 rows give the one-pass update (up to the last bit of
    CPU pow, whose vectorized and scalar tail paths differ by an ulp depending on a group's position)."""
    import scaleforge.platform.optim.adamw_fp8 as mod

    whole_p, chunked_p = _params(3), _params(3)
    whole = AdamWFP8(whole_p, **KW)
    _run(whole, whole_p, 3)
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 4 * 300)  # 4 rows of the (37, 300) parameter, 1 of (1, 129)
    chunked = AdamWFP8(chunked_p, **KW)
    _run(chunked, chunked_p, 3)
    fused_p = _params(3)
    _run(AdamWFP8(fused_p, fused=True, **KW), fused_p, 3)  # off the GPU: the fused step's reference, 2^24 chunks
    for a, b, c in zip(whole_p, chunked_p, fused_p):
        assert torch.allclose(a, b, rtol=1e-6, atol=0) and torch.equal(a, c)
    for k, v in whole.state[whole_p[0]].items():
        # the states' scales go through pow / log: a few ulps apart on some CPUs' vector paths
        assert torch.allclose(v.float(), chunked.state[chunked_p[0]][k].float(), rtol=1e-5, atol=0), k


def test_state_bytes_are_the_real_bytes_and_the_plans():
    params = _params(1)
    opt = AdamWFP8(params, **KW)
    _run(opt, params, 1)
    for p in params:
        real = sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step")
        assert real == state_bytes(p.shape) == optimizer_state_bytes("adamw_fp8", p.shape)
    big = (4096, 4096)
    assert 2.18 < state_bytes(big) / (4096 * 4096) < 2.2  # (128 + 12) / 128 per moment
    assert optimizer_state_bytes("adamw", big) == 8 * 4096 * 4096


def test_state_dict_resume_is_bit_exact():
    a_p = _params(2)
    a = AdamWFP8(a_p, **KW)
    _run(a, a_p, 6)
    b_p = _params(2)
    b = AdamWFP8(b_p, **KW)
    _run(b, b_p, 3)
    saved, saved_p = copy.deepcopy(b.state_dict()), [p.detach().clone() for p in b_p]
    c_p = [torch.nn.Parameter(t) for t in saved_p]
    c = AdamWFP8(c_p, **KW)
    c.load_state_dict(saved)
    assert c.state[c_p[0]]["exp_avg_q"].dtype == torch.float8_e4m3fn
    _run(c, c_p, 3, start=3)
    for x, y in zip(a_p, c_p):
        assert torch.equal(x, y)


def test_rejects_e5m2():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        AdamWFP8(_params(0), state_dtype=torch.float8_e5m2)


@pytest.fixture(scope="module")
def mesh():
    from scaleforge.platform.dist import _free_port

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_dtensor_states_match_plain(mesh):
    """On DTensor parameters the states are DTensors sharded like the parameter (so DCP reshards them) and the
    update is the plain-tensor one."""
    plain = _params(3)
    dt = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in _params(3)]
    a, b = AdamWFP8(plain, **KW), AdamWFP8(dt, **KW)
    for i in range(3):
        for p, q, g in zip(plain, dt, _grads(i)):
            p.grad, q.grad = g, distribute_tensor(g, mesh, [Shard(0)])
        a.step()
        b.step()
    for p, q in zip(plain, dt):
        assert torch.equal(p, q.to_local())
    st = b.state[dt[0]]
    assert isinstance(st["exp_avg_q"], DTensor) and st["exp_avg_q"].placements == (Shard(0),)
    assert st["exp_avg_scale"].shape == (37, 3)


def _cfg(*overrides):
    from scaleforge.models import recipe_config_class
    from scaleforge.platform.config import load_config

    return load_config("lm_tiny.yaml", list(overrides), recipe_config=recipe_config_class)


def test_coat_defaults_to_adamw_fp8_and_the_plan_counts_its_bytes():
    from scaleforge.models import get_recipe_class
    from scaleforge.platform.config import derive_layout
    from scaleforge.platform.plan import make_plan

    cfg = _cfg("parallel.fp8=coat")
    assert cfg.optim.name == "adamw_fp8" and _cfg().optim.name == "adamw"
    assert _cfg("parallel.fp8=coat", "optim.name=adamw").optim.name == "adamw"
    layout = derive_layout(cfg, 2)
    recipe = get_recipe_class(cfg.model.recipe)(cfg.model, cfg)
    plan = make_plan(cfg, layout, recipe)
    with torch.device("meta"):
        model = recipe.build_model(torch.device("meta"))
    expect = sum(state_bytes(p.shape) for p in model.parameters()) / 2 / 2**30
    assert plan.memory["optimizer (adamw_fp8)"] == pytest.approx(expect)
    assert plan.memory["optimizer (adamw_fp8)"] < 0.3 * plan.memory["params (fp32)"] * 2  # vs AdamW's 8 B/param
    bf16 = make_plan(_cfg(), layout, get_recipe_class(cfg.model.recipe)(cfg.model, _cfg()))
    assert 0 < plan.memory["activations"] < 0.7 * bf16.memory["activations"]  # COAT's FP8-saved activations
    assert "note" not in plan.extra


@pytest.mark.parametrize("override, key", [
    ("parallel.compile=true", "parallel.compile"),
    ("parallel.tp=2", "parallel.tp"),
    ("parallel.engine=deepspeed", "parallel.engine"),
])
def test_unsupported_coat_combinations_name_the_key(override, key):
    from scaleforge.platform.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        _cfg("parallel.fp8=coat", override)


def test_fp8_all_gather_without_coat_names_both_keys():
    from scaleforge.platform.config import ConfigError

    with pytest.raises(ConfigError, match=r"parallel.fp8_all_gather=true needs parallel.fp8=coat \(got 'none'\)"):
        _cfg("parallel.fp8_all_gather=true")
    assert _cfg("parallel.fp8=coat", "parallel.fp8_all_gather=true").parallel.fp8_all_gather


def test_coat_is_one_key_on_the_tiny_config():
    """lm_tiny computes in fp32 with torch's fused AdamW: parallel.fp8=coat alone switches to adamw_fp8 with its
    fused update (optim.fused) and keeps fp32 compute for the non-FP8 ops."""
    cfg = _cfg("parallel.fp8=coat")
    assert cfg.optim.name == "adamw_fp8" and cfg.optim.fused and cfg.parallel.mixed_precision == "fp32"
