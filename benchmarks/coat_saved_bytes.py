"""Saved-for-backward bytes of one LLM block, BF16 against COAT mode, per op (CPU-measurable; coat.md §3).

Runs one ``TransformerBlock`` forward in bf16 under ``torch.autograd.graph.saved_tensors_hooks`` and lists
every tensor autograd keeps for backward: the module and op that saved it, shape, dtype, bytes. Bytes are
counted once per storage (a tensor saved by two ops, or a view of a saved tensor, costs nothing more).
Parameters (and views of them) are listed but not counted: under FSDP2 they are the gathered bf16 weights,
which FSDP frees after forward whoever saved them. ``cos``/``sin`` are shared by every layer and not counted
per layer either. A copy of a weight (an FP8 weight code) is not a parameter and is counted.

The per-layer total is also printed in bytes per token per hidden unit (B = bytes / (tokens * dim)), the
unit of COAT's Table 2 divided by 2 (U = tokens * dim * 2 bytes): COAT's BF16 Llama layer 22.66 U = 45.3 B,
COAT 13.33 U = 26.7 B (coat.md §3).

  python benchmarks/coat_saved_bytes.py                                # Llama-2-7B layer, seq 256, per op
  python benchmarks/coat_saved_bytes.py --kernels triton               # bf16 baseline on the fused kernels
  python benchmarks/coat_saved_bytes.py --dim 1024 --ffn 2752 --heads 8 --seq 64 --summary
  python benchmarks/coat_saved_bytes.py --seq 2048 --kernels triton --count-launches   # kernels per block (GPU)
  python benchmarks/coat_saved_bytes.py --sana 1.6b --seq 1024 --summary  # a SANA-1.6B block at 1024 px
``--kernels triton`` selects the model's fused-kernel paths (fused RMSNorm, SwiGLU); on CPU they need
``TRITON_INTERPRET=1``, which the script sets itself. Runs on CUDA when available (``--device``).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch


@dataclass
class Saved:
    module: str
    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int  # bytes of the storage, 0 when it was already counted or is not counted (kind)
    kind: str  # activation | parameter | shared


def _graph_ops(root) -> dict[int, list[str]]:
    """storage data_ptr -> names of the autograd nodes that hold a tensor of that storage."""
    out: dict[int, list[str]] = {}
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = []
        if hasattr(node, "saved_tensors"):  # custom autograd.Function
            try:
                tensors = [t for t in node.saved_tensors if torch.is_tensor(t)]
            except RuntimeError:
                tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_") and not attr.startswith("_saved_tensors"):
                try:
                    v = getattr(node, attr)
                except RuntimeError:
                    continue
                tensors += [t for t in (v if isinstance(v, (tuple, list)) else [v]) if torch.is_tensor(t)]
        name = type(node).__name__.replace("Backward0", "").replace("Backward", "")
        for t in tensors:
            out.setdefault(t.untyped_storage().data_ptr(), []).append(name)
        stack.extend(fn for fn, _ in node.next_functions)
    return out


def account(block: torch.nn.Module, x: torch.Tensor, extra: tuple, shared: tuple[torch.Tensor, ...] = ()) -> list[Saved]:
    """Every tensor ``block(x, *extra)`` saves for backward, attributed to the innermost module running when it
    was saved and to the autograd node that holds it."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    shared_ptrs = {t.untyped_storage().data_ptr() for t in shared}
    stack: list[str] = []
    names = {m: n or "block" for n, m in block.named_modules()}
    def enter(m, args):
        stack.append(names[m])

    def leave(m, args, out):
        stack.pop()

    hooks = [h for m in block.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    raw: list[tuple[str, torch.Tensor]] = []

    def pack(t):
        raw.append((stack[-1] if stack else "block", t))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x, *extra)
    finally:
        for h in hooks:
            h.remove()
    ops = _graph_ops(out.grad_fn)
    rows, counted = [], set()
    for module, t in raw:
        ptr = t.untyped_storage().data_ptr()
        kind = "parameter" if ptr in params else "shared" if ptr in shared_ptrs else "activation"
        new = kind == "activation" and ptr not in counted
        counted.add(ptr)
        op = "/".join(sorted(set(ops.get(ptr, ["?"]))))
        rows.append(Saved(module, op, tuple(t.shape), t.dtype, t.untyped_storage().nbytes() if new else 0, kind))
    del out
    return rows


def _block(mode: str, dim: int, ffn: int, heads: int, seq: int, batch: int, kernels: str, device: str, seed: int = 0):
    """One Llama-style block (head_dim = dim / heads, no GQA, no bias) in bf16, BF16 or COAT mode, with its
    input x and the (cos, sin, mask) it takes after x."""
    from scaleforge import fp8 as coat
    from scaleforge.models.llm.model import AttentionMask, LLMModelConfig, TransformerBlock, rope_cos_sin, rope_inv_freq

    cfg = LLMModelConfig(preset=None, vocab_size=256, dim=dim, n_layers=1, n_heads=heads, ffn_hidden=ffn,
                         rope_theta=10000.0, max_seq_len=max(seq, 2048), norm_eps=1e-5, qkv_bias=False,
                         tied_embeddings=False, seq_len=seq, kernels=kernels).resolved()
    torch.manual_seed(seed)
    with torch.device(device):
        block = TransformerBlock(cfg, 0).to(torch.bfloat16)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        if mode == "coat":
            coat.convert_to_coat(block)
        x = torch.randn(batch, seq, dim, dtype=torch.bfloat16, requires_grad=True)
        cos, sin = rope_cos_sin(rope_inv_freq(cfg, x.device), torch.arange(seq).expand(batch, seq), torch.bfloat16)
    return block, x, (cos, sin, AttentionMask(causal=True))


def block_account(mode: str, dim: int, ffn: int, heads: int, seq: int, batch: int = 1, kernels: str = "torch",
                  device: str = "cpu", seed: int = 0) -> list[Saved]:
    """:func:`account` of one block (:func:`_block`)."""
    block, x, extra = _block(mode, dim, ffn, heads, seq, batch, kernels, device, seed)
    return account(block, x, extra, shared=extra[:2])


def sana_block_account(mode: str, preset: str, seq: int, batch: int = 1, device: str = "cpu") -> tuple[list[Saved], int]:
    """:func:`account` of one SANA block of ``preset`` over ``seq`` latent tokens (a square latent) and the
    preset's caption tokens; the text and the timestep modulation are shared by all blocks. Returns the rows
    and the hidden size."""
    from scaleforge import fp8 as coat
    from scaleforge.models.sana.model import SanaTransformer, preset_arch

    torch.manual_seed(0)
    arch = preset_arch(preset, depth=1)
    side = int(round(seq ** 0.5))
    with torch.device(device):
        model = SanaTransformer(arch).to(torch.bfloat16)
        if mode == "coat":
            coat.convert_to_coat(model.blocks)
        latents = torch.randn(batch, arch.in_channels, side, side, dtype=torch.bfloat16)
        text = torch.randn(batch, arch.text_len, arch.caption_channels, dtype=torch.bfloat16)
        with torch.no_grad():
            x, _, t0, y, mask, hw = model.embed(latents, torch.rand(batch), text, None)
    x = x.requires_grad_()
    return account(model.blocks[0], x, (t0, y, mask, hw), shared=(t0, y)), arch.hidden_size


def count_launches(mode: str, dim: int, ffn: int, heads: int, seq: int, batch: int = 1, kernels: str = "torch",
                   device: str = "cpu") -> dict[str, int]:
    """Ops one block's forward + backward runs, by name: device kernels on CUDA (torch.profiler), aten ops
    (each a kernel launch on a GPU, or more) on CPU, where the FP8 blocks run the torch references."""
    from torch.utils._python_dispatch import TorchDispatchMode

    block, x, extra = _block(mode, dim, ffn, heads, seq, batch, kernels, device)
    run = lambda: block(x, *extra).sum().backward()  # noqa: E731
    run()  # warm-up (autotuning, compilation)
    counts: dict[str, int] = {}
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                counts[e.name[:60]] = counts.get(e.name[:60], 0) + 1
        return counts

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return counts


def per_token_dim(rows: list[Saved], tokens: int, dim: int) -> float:
    return sum(r.nbytes for r in rows) / (tokens * dim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kernels", default="torch", choices=("torch", "triton"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="bf16,coat")
    ap.add_argument("--sana", default=None, metavar="PRESET",
                    help="instead of the LLM block: one SANA block of this preset (e.g. 1.6b) over --seq latent tokens")
    ap.add_argument("--summary", action="store_true", help="only the per-layer totals")
    ap.add_argument("--count-launches", action="store_true",
                    help="instead: ops per block forward + backward (CUDA kernels on a GPU, aten ops on CPU)")
    args = ap.parse_args()
    if args.kernels == "triton" and args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    tokens = args.batch * args.seq
    if args.count_launches:
        counts = {m: count_launches(m, args.dim, args.ffn, args.heads, args.seq, args.batch, args.kernels,
                                    args.device) for m in args.modes.split(",")}
        what = "CUDA kernels" if args.device == "cuda" else "aten ops"
        print(f"{what} per block forward + backward ({tokens} tokens, kernels={args.kernels}):")
        for mode, c in counts.items():
            top = ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])[:12])
            print(f"{mode:<6} | {sum(c.values()):>5} | {top}")
        return
    totals = {}
    for mode in args.modes.split(","):
        if args.sana:
            rows, args.dim = sana_block_account(mode, args.sana, args.seq, args.batch, args.device)
        else:
            rows = block_account(mode, args.dim, args.ffn, args.heads, args.seq, args.batch, args.kernels,
                                 args.device)
        totals[mode] = sum(r.nbytes for r in rows)
        if args.summary:
            continue
        what = f"SANA {args.sana} block" if args.sana else f"dim {args.dim}, ffn {args.ffn}, heads {args.heads}"
        print(f"\n## {mode}: {what}, {tokens} tokens, kernels={args.kernels}, {args.device}")
        print(f"{'module':<28} | {'op (autograd node)':<44} | {'shape':<20} | {'dtype':<14} | {'MiB':>8} | kind")
        for r in rows:
            print(f"{r.module:<28} | {r.op[:44]:<44} | {str(r.shape):<20} | {str(r.dtype)[6:]:<14} | "
                  f"{r.nbytes / 2**20:>8.2f} | {r.kind if r.nbytes or r.kind != 'activation' else 'same storage'}")
    print(f"\n{'mode':<6} | {'saved MiB/layer':>15} | {'B/(token*dim)':>13} | {'vs bf16':>7}")
    for mode, b in totals.items():
        ratio = b / totals["bf16"] if "bf16" in totals else float("nan")
        print(f"{mode:<6} | {b / 2**20:>15.2f} | {b / (tokens * args.dim):>13.2f} | {ratio:>7.3f}")
    print("COAT Table 2 (coat.md §3): bf16 45.3, COAT 26.7 B/(token*dim) (0.59x)")


if __name__ == "__main__":
    main()
