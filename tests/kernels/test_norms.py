import pytest
import torch

from _kernel_testing import DEVICE, TOL, needs_triton, rel_err
from scaleforge.kernels import layer_norm, rms_norm
from scaleforge.kernels.reference.norms import layer_norm_ref, rms_norm_ref

pytestmark = needs_triton
FNS = {"rms": (rms_norm, rms_norm_ref), "layer": (layer_norm, layer_norm_ref)}


def _r(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=grad)


def _case(kind, fn_name, b, n, c, dtype, grad):
    x = _r(b, n, c, dtype=dtype, grad=grad)
    args = [x, _r(c, dtype=dtype, grad=grad)]
    if fn_name == "layer":
        args.append(_r(c, dtype=dtype, grad=grad))
    kw = {}
    if kind in ("mod", "full"):
        kw.update(shift=_r(b, 1, c, dtype=dtype, grad=grad), scale=_r(b, c, dtype=dtype, grad=grad))
    if kind in ("res", "full"):
        kw.update(residual=_r(b, n, c, dtype=dtype, grad=grad), gate=_r(b, 1, c, dtype=dtype, grad=grad))
    if kind == "per_token":
        kw.update(shift=_r(b, n, c, grad=grad), scale=_r(c, grad=grad), residual=_r(b, n, c, grad=grad), gate=_r(b, n, c, grad=grad))
    if kind == "no_affine":
        args = [x]
    return args, kw


KINDS = ["plain", "no_affine", "mod", "res", "full", "per_token"]


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bnc", [(2, 13, 37), (1, 5, 256), (3, 1, 1000)])
def test_forward_and_backward_match_reference(fn_name, kind, bnc):
    fn, ref_fn = FNS[fn_name]
    args, kw = _case(kind, fn_name, *bnc, torch.float32, grad=True)
    out = fn(*args, **kw, backend="triton")
    ref = ref_fn(*args, **kw)
    out, ref = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    assert len(out) == (2 if "residual" in kw else 1)
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-5
    inputs = args + list(kw.values())
    gs = [torch.randn_like(t) for t in ref]
    for a, b in zip(torch.autograd.grad(out, inputs, gs), torch.autograd.grad(ref, inputs, gs)):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("fn_name", FNS)
def test_fp16_forward(fn_name):
    fn, ref_fn = FNS[fn_name]
    args, kw = _case("full", fn_name, 2, 9, 96, torch.float16, grad=False)
    out = fn(*args, **kw, backend="triton")
    ref = ref_fn(*[a.float() for a in args], **{k: v.float() for k, v in kw.items()})
    for a, b in zip(out, ref):
        assert a.dtype == torch.float16
        assert rel_err(a, b) < TOL[torch.float16]


def test_modulation_is_applied_as_adaln():
    x = _r(2, 4, 64)
    shift, scale = _r(2, 1, 64), _r(2, 1, 64)
    plain = layer_norm(x, backend="triton")
    mod = layer_norm(x, shift=shift, scale=scale, backend="triton")
    assert rel_err(mod, plain * (1 + scale) + shift) < 1e-6


def test_bad_modulation_shape_is_named():
    x = _r(2, 4, 64)
    with pytest.raises(ValueError, match="shift"):
        rms_norm(x, shift=_r(4, 64)[:3], backend="triton")
    with pytest.raises(ValueError, match="gate is only used with residual"):
        rms_norm(x, gate=_r(64), backend="triton")


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("kind", ["full", "per_token", "mod"])
@pytest.mark.parametrize(
    "cfg",
    [(1, 4, True, 0), (1, 2, True, 1, True), (2, 4, False, 1), (4, 4, False, 4, True), (8, 2, False, 64),
     (2, 8, False, 0)],
    ids=["r1-split-tile-per-prog", "r1-split-one-prog-per-sm", "r2-one-prog-per-sm", "r4-evict", "r8-many-progs",
         "r2-tile-per-prog"],
)
def test_launch_configs_match_reference(monkeypatch, fn_name, kind, cfg):
    """Every tile shape the tuner sweeps: one tile per program and persistent programs walking several row
    tiles with a tail tile (7 rows per sample), C = 80 split into 64 + 16 columns in the forward and one
    masked 128 block in the backward, streamed (evict_first) loads."""
    from scaleforge.kernels import norms

    fwd = norms.launch.NormConfig(*cfg)
    bwd = fwd._replace(split=False, progs_per_sm=fwd.progs_per_sm or 2)
    monkeypatch.setattr(norms.op, "_default_config", lambda c, backward, case="layer": bwd if backward else fwd)
    fn, ref_fn = FNS[fn_name]
    args, kw = _case(kind, fn_name, 3, 7, 80, torch.float32, grad=True)
    out = fn(*args, **kw, backend="triton")
    ref = ref_fn(*args, **kw)
    out, ref = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-5
    inputs = args + list(kw.values())
    gs = [torch.randn_like(t) for t in ref]
    for a, b in zip(torch.autograd.grad(out, inputs, gs), torch.autograd.grad(ref, inputs, gs)):
        assert rel_err(a, b) < 1e-5


def test_default_configs_are_valid():
    """The defaults table: forward and backward configs for every case and C class, backward unsplit with
    programs per SM (it reduces per-program partials)."""
    from scaleforge.kernels import norms

    for c in (37, 1152, 2240, 4096, 16384):
        for case in ("layer", "rms", "res"):
            f, b = norms.launch._default_config(c, False, case), norms.launch._default_config(c, True, case)
            assert not b.split and b.progs_per_sm > 0
            assert f.block_r & (f.block_r - 1) == 0 and b.block_r & (b.block_r - 1) == 0
            assert f.block_r == 1 or not f.split


def test_invalid_configs_are_named(monkeypatch):
    from scaleforge.kernels import norms

    x = _r(2, 4, 80)
    bad = [((2, 4, True, 0), False, "split needs block_r == 1"), ((1, 4, True, 4), True, "no split"),
           ((1, 4, False, 0), True, "progs_per_sm")]
    for cfg, backward, match in bad:
        monkeypatch.setattr(norms.op, "_default_config", lambda c, bwd, case="layer", cfg=cfg: norms.launch.NormConfig(*cfg))
        with pytest.raises(ValueError, match=match):
            x.requires_grad_(backward)
            y = layer_norm(x, backend="triton")
            if backward:
                y.sum().backward()


def test_column_split():
    from scaleforge.kernels import norms

    assert norms.launch._blocks(2240, True) == (2048, 256)
    assert norms.launch._blocks(1152, True) == (1024, 128)
    assert norms.launch._blocks(4096, True) == (4096, 0)
    assert norms.launch._blocks(2240, False) == (4096, 0)


def _mod(t, x, name):
    """A modulation tensor as the kernels take it (its own shape, contiguous) and its rows of x per row."""
    from scaleforge.kernels import norms

    return (None if t is None else t.contiguous()), norms._mod_rows(t, x, name)


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("kind", ["full", "mod", "per_token"])
@pytest.mark.parametrize("opt", [dict(prefetch=True), dict(stages=2), dict(prefetch=True, stages=2)],
                         ids=["prefetch", "stages2", "both"])  # fmt: skip
@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("bnc,dtype", [((3, 7, 80), torch.float32), ((2, 5, 37), torch.float16)],
                         ids=["80-fp32", "37-fp16"])  # fmt: skip
def test_backward_prefetch_and_stages_match_reference(fn_name, kind, opt, r, bnc, dtype):
    """The backward's latency-hiding options through norm_bwd_impl with an explicit config: programs walk
    several row tiles (4 SMs on CPU, one program per SM) with a tail chunk and a masked tail tile (7 or 5
    rows per sample), C not a power of two, so the prefetch past the end and masked columns are exercised."""
    from scaleforge.kernels import norms

    fn, ref_fn = FNS[fn_name]
    is_rms = fn_name == "rms"
    b, n, c = bnc
    args, kw = _case(kind, fn_name, b, n, c, dtype, grad=True)
    kw = {k: v.to(dtype).detach().requires_grad_() for k, v in kw.items()}  # per_token builds fp32 tensors
    x, weight, bias = args[0], args[1], (args[2] if fn_name == "layer" else None)
    d = lambda t: None if t is None else t.detach()  # noqa: E731
    g2, p_gate = _mod(d(kw.get("gate")), x, "gate")
    sh2, p_shift = _mod(d(kw.get("shift")), x, "shift")
    sc2, p_scale = _mod(d(kw.get("scale")), x, "scale")
    x2, res = x.detach().reshape(-1, c), "residual" in kw
    r2 = d(kw["residual"]).reshape(-1, c) if res else None
    _, h, mean, rstd, _ = norms.op.norm_fwd_impl(x2, r2, g2, d(weight), d(bias), sh2, sc2, p_gate, p_shift, p_scale,
                                           1e-6, is_rms)  # fmt: skip
    gy, gh = torch.randn_like(x), torch.randn_like(x)
    cfg = norms.launch.NormConfig(r, 2, False, 1)._replace(**opt)
    dx, dr, dg, dw, db, dsh, dsc = norms.op.norm_bwd_impl(
        gy.reshape(-1, c), gh.reshape(-1, c) if res else None, h if res else x2, x2 if g2 is not None else None,
        g2, d(weight), d(bias), sc2, mean, rstd, res, sh2 is not None, p_gate, p_shift, p_scale, is_rms, cfg=cfg)
    ref = ref_fn(*[a.float() for a in args], **{k: v.float() for k, v in kw.items()})
    ref = ref if isinstance(ref, tuple) else (ref,)
    inputs = args + list(kw.values())
    ref_grads = torch.autograd.grad(ref, inputs, (gy.float(), gh.float())[: len(ref)])
    ours = {"x": dx, "weight": dw, "bias": db, "shift": dsh, "scale": dsc, "residual": dr, "gate": dg}
    names = ["x", "weight", "bias"][: len(args)] + list(kw)
    for name, t, want in zip(names, inputs, ref_grads):
        got = ours[name].reshape(t.shape)
        assert rel_err(got, want) < TOL[dtype], name


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("kind", ["full", "mod", "per_token"])
@pytest.mark.parametrize("cfg", [(1, 2, True, 1, False, False, 2), (2, 2, False, 1, False, False, 3)],
                         ids=["split-r1-s2", "r2-s3"])  # fmt: skip
def test_forward_stages_match_reference(fn_name, kind, cfg):
    """The forward with the pipelined row loop (NormConfig.stages) through norm_fwd_impl: programs walk several
    row tiles with a masked tail (7 rows per sample), C not a power of two; y and h against the reference."""
    from scaleforge.kernels import norms

    fn, ref_fn = FNS[fn_name]
    b, n, c = 3, 7, 80
    args, kw = _case(kind, fn_name, b, n, c, torch.float32, grad=False)
    x, weight, bias = args[0], args[1], (args[2] if fn_name == "layer" else None)
    g2, p_gate = _mod(kw.get("gate"), x, "gate")
    sh2, p_shift = _mod(kw.get("shift"), x, "shift")
    sc2, p_scale = _mod(kw.get("scale"), x, "scale")
    r2 = kw["residual"].reshape(-1, c) if "residual" in kw else None
    y, h, _, _, _ = norms.op.norm_fwd_impl(x.reshape(-1, c), r2, g2, weight, bias, sh2, sc2, p_gate, p_shift, p_scale,
                                     1e-6, fn_name == "rms", cfg=norms.launch.NormConfig(*cfg))  # fmt: skip
    ref = ref_fn(*args, **kw)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert rel_err(y.reshape(x.shape), ref[0]) < TOL[torch.float32]
    if r2 is not None:
        assert rel_err(h.reshape(x.shape), ref[1]) < TOL[torch.float32]


def test_pipeline_stages_fit_shared_memory(monkeypatch):
    """_fit_stages keeps the tuned stages where their shared-memory copies fit and lowers them where they do
    not (fp32 inputs, per-token modulation, smaller GPUs); the sm_90 case that failed to launch in the round-3
    sweep (4 rows x 4096 x four bf16 tensors, 3 stages: 262,464 bytes of 232,448) gets 2."""
    from scaleforge.kernels import norms

    monkeypatch.setattr(norms.launch, "_smem_budget", lambda index: 232448)
    cuda = torch.device("cuda", 0)
    bf16 = [torch.empty(1, dtype=torch.bfloat16)] * 4
    f32 = [torch.empty(1, dtype=torch.float32)] * 6
    cfg = norms.launch.NormConfig(4, 16, False, 4, False, False, 3)
    assert norms.launch._fit_stages(cfg, 4 * 4096, bf16, cuda).stages == 2
    tuned = norms.launch.NormConfig(1, 8, False, 4, False, False, 4)  # gated residual backward at C = 2240
    assert norms.launch._fit_stages(tuned, 4096, bf16 + [None], cuda) == tuned
    assert norms.launch._fit_stages(tuned, 4096, f32, cuda).stages == 3  # six fp32 streams: 96 KiB a copy, 2 fit
    monkeypatch.setattr(norms.launch, "_smem_budget", lambda index: 99 * 1024)
    assert norms.launch._fit_stages(tuned, 4096, f32, cuda).stages == 0  # not even two stages fit
    assert norms.launch._fit_stages(tuned, 4096, bf16, torch.device("cpu")) == tuned  # the interpreter has no limit


def test_launch_helpers_take_symbolic_sizes():
    """torch.compile with dynamic shapes runs the launch code with SymInt sizes, which cannot be hashed: the
    cached helpers (modulation layout, launch plans) then compute uncached, with the same results."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from scaleforge.kernels import norms
    from scaleforge.kernels._triton_utils import cached_call

    mode = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC, DimDynamic.STATIC])
    x = mode.from_tensor(torch.randn(2, 5, 48), symbolic_context=dynamic)
    shift = mode.from_tensor(torch.randn(2, 1, 48))
    assert isinstance(x.shape[1], torch.SymInt)
    assert norms._mod_rows(shift, x, "shift") == 5 and norms._mod_rows(None, x, "shift") == 0
    with pytest.raises(ValueError, match="shift"):
        norms._mod_rows(mode.from_tensor(torch.randn(3, 1, 48)), x, "shift")
    m = x.shape[0] * x.shape[1]
    cfg = norms.launch._default_config(48, False, "layer")
    dtypes = (torch.float32,) + (None,) * 4 + (torch.float32,) * 2
    grid, meta = cached_call(norms.launch._fwd_plan, m, 48, cfg, False, False, 0, 5, 5, dtypes, torch.device("cpu"))
    want_grid, want_meta = norms.launch._fwd_plan(10, 48, cfg, False, False, 0, 5, 5, dtypes, torch.device("cpu"))
    assert [int(g) for g in grid] == list(want_grid)
    assert {k: int(v) if isinstance(v, torch.SymInt) else v for k, v in meta.items()} == want_meta


# modulation layouts for x of (2, 5, C): absent, per channel (C,) / (1, 1, C), per sample (B, 1, C) / (B, C),
# per token
_LAYOUTS = {"none": None, "C": ("C",), "11C": (1, 1, "C"), "B1C": (2, 1, "C"), "BC": (2, "C"), "tok": (2, 5, "C")}


def _layout(name, c):
    shape = _LAYOUTS[name]
    return None if shape is None else tuple(c if d == "C" else d for d in shape)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float16, torch.float32, torch.float32),
                                    (torch.float16, torch.float16, torch.float32)],
                         ids=["fp32", "fp16-x-fp32-params-mods", "fp16-x-params-fp32-mods"])  # fmt: skip
@pytest.mark.parametrize("fn_name", FNS)
def test_modulation_layouts_and_dtypes_through_autograd(fn_name, dtypes):
    """Every modulation layout in each of gate, shift and scale (rotated, so each pairs with the others'
    layouts), with weight and bias, parameters and modulation in other dtypes than x: the public function's
    outputs and every gradient against the torch backend, and each gradient (read in the registered backward,
    before the autograd engine would cast or reshape it) in its input's shape and dtype. The backward stacks
    per-sample and per-channel partials by name; a wrong order or cast would show here."""
    fn = FNS[fn_name][0]
    xdt, pdt, mdt = dtypes
    b, n, c = 2, 5, 48
    names = list(_LAYOUTS)
    seen = {}
    import scaleforge.kernels.norms as norms

    real_backward = norms.op._norm_backward

    def spy(ctx, *grads):
        out = real_backward(ctx, *grads)
        seen["grads"] = out
        return out

    for i, g_lay in enumerate(names):
        sh_lay, sc_lay = names[(i + 2) % len(names)], names[(i + 4) % len(names)]
        x = torch.randn(b, n, c, device=DEVICE, dtype=xdt, requires_grad=True)
        kw = dict(residual=torch.randn(b, n, c, device=DEVICE, dtype=xdt, requires_grad=True))
        for key, lay in (("gate", g_lay), ("shift", sh_lay), ("scale", sc_lay)):
            if _layout(lay, c) is not None:
                kw[key] = torch.randn(_layout(lay, c), device=DEVICE, dtype=mdt, requires_grad=True)
        params = [torch.randn(c, device=DEVICE, dtype=pdt, requires_grad=True)]
        if fn_name == "layer":
            params.append(torch.randn(c, device=DEVICE, dtype=pdt, requires_grad=True))
        inputs = [x, *params, *kw.values()]
        ref = fn(x, *params, **kw, backend="torch")
        gys = [torch.randn_like(r) for r in ref]
        want = torch.autograd.grad(ref, inputs, gys)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(norms.op._norm_fwd._function, "backward", staticmethod(spy))
            out = fn(x, *params, **kw, backend="triton")
            got = torch.autograd.grad(out, inputs, gys)
        tol = 1e-5 if xdt == torch.float32 else 5e-3
        for o, r in zip(out, ref):
            assert o.dtype == r.dtype and rel_err(o, r) < tol, (g_lay, sh_lay, sc_lay)
        for t, a, w in zip(inputs, got, want):
            assert rel_err(a, w) < tol, (g_lay, sh_lay, sc_lay, tuple(t.shape))
        # the registered backward's gradients: dx, dresidual, dgate, dweight, dbias, dshift, dscale
        raw = dict(zip(("x", "residual", "gate", "weight", "bias", "shift", "scale"), seen["grads"]))
        given = dict(x=x, weight=params[0], bias=params[1] if len(params) > 1 else None, **kw)
        for key, t in ((k, v) for k, v in given.items() if v is not None):
            assert raw[key].shape == t.shape and raw[key].dtype == t.dtype, (key, g_lay, sh_lay, sc_lay)


def test_non_contiguous_inputs_and_empty_x():
    """Strided views everywhere (x transposed, weight and bias every other element of a longer vector, a (B, C)
    shift sliced out of a wider tensor, scale and gate expanded with zero strides) give the torch backend's
    outputs and gradients; an empty x gives empty outputs."""
    b, n, c = 3, 4, 40
    r = lambda *s: torch.randn(*s, device=DEVICE, requires_grad=True)  # noqa: E731
    t, wb, big, s0, g0, res = r(n, b, c), r(2 * c), r(b, 3 * c), r(b, 1, c), r(1, 1, c), r(b, n, c)
    x, w, bias = t.transpose(0, 1), wb[::2], wb[1::2]
    kw = dict(shift=big[:, c:2 * c], scale=s0.expand(b, n, c), residual=res, gate=g0.expand(b, 1, c))
    leaves = [t, wb, big, s0, g0, res]
    outs = [layer_norm(x, w, bias, **kw, backend=be) for be in ("triton", "torch")]
    gys = [torch.randn_like(o) for o in outs[1]]
    grads = [torch.autograd.grad(o, leaves, gys) for o in outs]
    for a, b_ in zip(outs[0] + grads[0], outs[1] + grads[1]):
        assert rel_err(a, b_) < 1e-5
    for fn in (layer_norm, rms_norm):
        e = torch.randn(0, 7, c, device=DEVICE)
        y = fn(e, torch.randn(c, device=DEVICE), shift=torch.randn(c, device=DEVICE), backend="triton")
        assert y.shape == e.shape


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("kind", ["plain", "full", "per_token"])
@pytest.mark.parametrize(
    "cfg", [None, (1, 2, True, 1, False, False, 2), (2, 4, False, 1), (8, 2, False, 64), (2, 8, False, 0)],
    ids=["default", "r1-split-s2", "r2-one-prog-per-sm", "r8-many-progs", "r2-tile-per-prog"],
)
def test_return_amax_is_the_outputs_max_and_quantizes_like_its_own_pass(monkeypatch, fn_name, kind, cfg):
    """return_amax: max|y| folded by every program (tail tiles, C = 80 with 48 masked columns unsplit, many
    programs) into one fp32 0-d tensor, equal to max|y| of the y it returns; quantize_fp8 given that amax gives
    the codes and scale of its own amax pass (fp8_linear's x_amax: test_fp8_linear.py). x sits 50 away from zero, so
    the layer norm's masked lanes (computed from zeros: about -50 x weight) would win the max were they not
    masked. The weight's last column (20, the others ~1) puts the max in the split layout's second piece.
    Gradients are unchanged by the flag."""
    from scaleforge.kernels import norms, quantize_fp8

    if cfg is not None:
        fwd = norms.launch.NormConfig(*cfg)
        monkeypatch.setattr(norms.op, "_default_config",
                            lambda c, backward, case="layer": norms.launch.NormConfig(1, 2, False, 2) if backward else fwd)
    fn = FNS[fn_name][0]
    args, kw = _case(kind, fn_name, 3, 7, 80, torch.float32, grad=True)
    args[0] = (args[0].detach() + 50).requires_grad_()
    with torch.no_grad():  # the max in the last column: the second column piece of the split layout (64 + 16)
        args[1][-1] = 20.0
    out = fn(*args, **kw, backend="triton")
    out_a = fn(*args, **kw, return_amax=True, backend="triton")
    ref_a = fn(*args, **kw, return_amax=True, backend="torch")
    out = out if isinstance(out, tuple) else (out,)
    assert len(out_a) == len(ref_a) == len(out) + 1
    amax, y = out_a[-1], out_a[0]
    assert amax.shape == () and amax.dtype == torch.float32 and not amax.requires_grad
    assert torch.equal(amax, y.detach().abs().amax())
    assert rel_err(amax, ref_a[-1]) < 1e-5
    for a, b in zip(out_a[:-1], out):
        assert torch.equal(a, b)
    inputs = args + list(kw.values())
    gs = [torch.randn_like(t) for t in out]
    for a, b in zip(torch.autograd.grad(out_a[:-1], inputs, gs), torch.autograd.grad(out, inputs, gs)):
        assert torch.equal(a, b)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q, s = quantize_fp8(y.detach(), "tensor", dtype=dtype, amax=amax, backend="triton")
        q0, s0 = quantize_fp8(y.detach(), "tensor", dtype=dtype, backend="triton")
        assert torch.equal(s, s0) and torch.equal(q.view(torch.uint8), q0.view(torch.uint8))


def test_return_amax_fp16_and_empty():
    """fp16 output: the max of the rounded values as stored; an empty x gives amax 0."""
    args, kw = _case("full", "layer", 2, 9, 96, torch.float16, grad=False)
    y, h, amax = layer_norm(*args, **kw, return_amax=True, backend="triton")
    assert y.dtype == torch.float16 and torch.equal(amax, y.abs().amax().float())
    e = torch.randn(0, 3, 96, device=DEVICE)
    for be in ("triton", "torch"):
        y, amax = rms_norm(e, return_amax=True, backend=be)
        assert y.shape == e.shape and amax.item() == 0.0


def test_return_amax_ignores_masked_lanes(monkeypatch):
    """A tail tile's masked rows compute y from zeros: with a per-token scale of -1 the real outputs are the
    shift alone (|y| <= 1), the masked rows' bias + shift (~100) would win the max unless masked."""
    from scaleforge.kernels import norms

    monkeypatch.setattr(norms.op, "_default_config", lambda c, backward, case="layer": norms.launch.NormConfig(2, 4, False, 1))
    b, n, c = 3, 7, 80
    x = torch.randn(b, n, c, device=DEVICE)
    bias = torch.full((c,), 100.0, device=DEVICE)
    shift, scale = torch.rand(b, 1, c, device=DEVICE), torch.full((b, n, c), -1.0, device=DEVICE)
    y, amax = layer_norm(x, torch.randn(c, device=DEVICE), bias, shift=shift, scale=scale, return_amax=True,
                         backend="triton")  # fmt: skip
    assert torch.equal(y, shift.expand_as(y)) and torch.equal(amax, shift.max())
