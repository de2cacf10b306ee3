"""Helpers shared by the triton kernel files (imported only when triton is installed)."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from scaleforge.kernels._backend import triton_interpreting


def dot_precision() -> str:
    """fp32 x fp32 tl.dot precision: three-pass TF32 (about fp32 accurate, on tensor cores) on GPU;
    the interpreter computes in numpy fp32 and only accepts the plain names."""
    return "ieee" if triton_interpreting() else "tf32x3"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The interpreter runs every config it is given, so it gets only the first one."""
    return configs[:1] if triton_interpreting() else configs


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Host-side integer helpers for the launch paths: triton.cdiv and triton.next_power_of_2 are constexpr
# functions in triton 3.6, whose call wrapper unwraps every argument (~6 us per call on a fast host).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    if type(n) is not int:  # a SymInt under torch.compile with dynamic shapes
        return triton.next_power_of_2(n)
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cached_call(fn, *args):
    """fn(*args) through fn's functools.lru_cache, or uncached under torch.compile: Dynamo warns at lru_cache'd
    calls, and with dynamic shapes the sizes (also inside tuple arguments, e.g. shapes) are SymInts, which
    cannot be hashed."""
    if torch.compiler.is_compiling() or _has_symint(args):
        return fn.__wrapped__(*args)
    return fn(*args)


def _has_symint(args: tuple) -> bool:
    """A SymInt among args or inside their tuples (type scans in C: this runs on every eager launch)."""
    types = set(map(type, args))
    if torch.SymInt in types:
        return True
    return tuple in types and any(torch.SymInt in map(type, a) for a in args if type(a) is tuple)


@triton.jit
def dot_f32acc(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands use PREC (see dot_precision)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.dot(a, b, out_dtype=tl.float32)


# --- custom ops with a direct eager path ---------------------------------------------------------------
# Set False to send every call through the torch.library op (tests compare the two paths).
EAGER_DIRECT = True
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def eager_direct_ok(args) -> bool:
    """Whether a call may run its implementation directly instead of through its torch.library op: not
    under torch.compile / export tracing, no dispatch mode or functorch transform active, and every tensor
    argument a plain tensor (no FakeTensor, FunctionalTensor, DTensor or other subclass). Compile, export,
    fake-tensor and subclass users still get the op (and its fake / functional registrations)."""
    if not EAGER_DIRECT or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, torch.Tensor))


try:
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # older torch: launches stay correct, only slower
    _set_wrap_triton_enabled = None


def direct_launch():
    """Inside our own eager path, ``torch.library.wrap_triton`` must hand back the plain kernel (as it does
    inside a triton_op's eager implementation); left on, every launch goes through the higher-order-op
    machinery, ~0.4-0.6 ms of host time on the H200 hosts (benchmarks/kernels/host_overhead.py)."""
    if _set_wrap_triton_enabled is None:
        return contextlib.nullcontext()
    return _set_wrap_triton_enabled(False)


class KernelOp:
    """A ``torch.library.triton_op`` plus a direct eager path.

    ``torch.compile(fullgraph=True)``, export and fake tensors go through the op (``self.op``), which
    Inductor traces into. Plain eager calls on ordinary tensors call the implementation directly, and
    for ops with autograd a ``torch.autograd.Function`` carrying the same ``setup_context`` and
    ``backward``: the custom-op dispatch (schema parsing, alias checks, the generated autograd wrapper
    that materializes zero gradients for every unused output) costs 0.2-0.5 ms of host time per call on
    the H200 hosts, more than many of these kernels run (benchmarks/kernels/host_overhead.py,
    docs/benchmarks.md). The numerics are the implementation's either way. Calls that need gradients
    from an op without an autograd formula take the op, which raises on backward (never a silently
    missing gradient)."""

    def __init__(self, name: str, impl):
        self.name, self.impl = name, impl
        self.op = torch.library.triton_op(name, impl, mutates_args=())
        self._function = None

    def register_autograd(self, backward, setup_context, non_differentiable: tuple[int, ...] = ()) -> None:
        """``backward`` receives None for the gradient of an output that was not used."""
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        # forward(ctx, *args) with the context set up inside it, not a separate setup_context staticmethod:
        # Function.apply binds a separate setup_context's arguments through inspect.signature on every call
        # (~55 us of host time on a fast host). Functorch transforms (which need the separate form) take the
        # op instead (eager_direct_ok), whose generated autograd raises under them as it did before.
        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                with direct_launch():
                    output = impl(*args)
                setup_context(ctx, args, output)
                ctx.set_materialize_grads(False)
                if non_differentiable:
                    ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        Function.__name__ = Function.__qualname__ = self.name.split("::")[-1] + "_eager"
        self._function = Function

    def __call__(self, *args):
        if not eager_direct_ok(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if self._function is None:
                # no autograd formula: the op raises on backward instead of dropping the gradient silently
                # (also what a double backward through a backward op reaches)
                return self.op(*args)
            return self._function.apply(*args)
        with direct_launch():
            return self.impl(*args)


def kernel_op(name: str):
    """Decorator: ``@kernel_op("scaleforge::name")`` over a triton_op implementation -> ``KernelOp``."""
    return lambda impl: KernelOp(name, impl)
