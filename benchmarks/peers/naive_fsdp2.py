"""The naive FSDP2 yardstick: a plain training script, no platform, no tuning.

    torchrun --nproc-per-node 1 benchmarks/peers/naive_fsdp2.py --arch gpt --compile
    torchrun --nproc-per-node 1 benchmarks/peers/naive_fsdp2.py --arch llama --compile
    torchrun --nproc-per-node 1 benchmarks/peers/naive_fsdp2.py --arch ours --compile --float8
    python benchmarks/peers/naive_fsdp2.py --arch gpt --tiny --steps 3 --warmup 1      # CPU smoke run

``--arch gpt``: 0.94B GPT-style model (16 layers, d 2048, 16 heads, LayerNorm, learned positions, GELU MLP
4x, vocab 32000, untied output). ``--arch llama``: the same plain code with lm_1b's Llama dims (16 layers,
d 2048, 16 heads, RMSNorm, RoPE, SwiGLU 5632, vocab 50304, untied), so one ratio compares the same
model. ``--arch ours``: scaleforge's own ``Transformer`` (the ``1b`` preset) in this plain loop, which is
where ``--float8`` applies torchao's float8 training (tensorwise scales, every block linear; the output
projection stays bf16, as torchtitan does).

Everything else is what a first FSDP2 script does: ``fully_shard`` per block then the root with
``MixedPrecisionPolicy(param_dtype=bf16)`` (gradients reduce in bf16 too), fp32 master weights, fused
AdamW, optional per-block ``torch.compile``, no activation checkpointing, random tokens, seq 2048,
micro-batch 4. Rank 0 prints a ``RESULT {json}`` line: medians over the steps after warm-up of
tokens/s/GPU, MFU by ``benchmarks/peers/flops.py``, and the peak of ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import flops_per_token, mfu  # noqa: E402

DIMS = {
    "gpt": dict(n_layers=16, dim=2048, n_heads=16, vocab=32000, ffn=4 * 2048),
    "llama": dict(n_layers=16, dim=2048, n_heads=16, vocab=50304, ffn=5632),
    "ours": dict(n_layers=16, dim=2048, n_heads=16, vocab=50304, ffn=5632),
}
TINY = dict(n_layers=2, dim=64, n_heads=4, vocab=256, ffn=192)


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class LlamaBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w1, self.w3 = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        h = self.n1(x)
        q, k, v = (w(h).view(b, s, self.heads, d // self.heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))

        def rope(t):
            t1, t2 = t.chunk(2, dim=-1)
            return t * cos + torch.cat((-t2, t1), dim=-1) * sin

        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, s, d))
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class PlainLM(nn.Module):
    def __init__(self, arch: str, n_layers: int, dim: int, n_heads: int, vocab: int, ffn: int, seq: int):
        super().__init__()
        self.arch, self.head_dim = arch, dim // n_heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim) if arch == "gpt" else None
        block = GPTBlock if arch == "gpt" else LlamaBlock
        self.layers = nn.ModuleList(block(dim, n_heads, ffn) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim) if arch == "gpt" else nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids):
        s = ids.shape[1]
        h = self.tok(ids)
        if self.pos is not None:
            h = h + self.pos.weight[:s]
            for blk in self.layers:
                h = blk(h)
        else:
            inv = 1.0 / (10000.0 ** (torch.arange(0, self.head_dim, 2, device=ids.device).float() / self.head_dim))
            ang = torch.arange(s, device=ids.device).float()[:, None] * inv
            ang = torch.cat((ang, ang), dim=-1)
            cos, sin = ang.cos().to(h.dtype), ang.sin().to(h.dtype)
            for blk in self.layers:
                h = blk(h, cos, sin)
        return self.output(self.norm(h))


def build_model(arch: str, dims: dict, seq: int) -> tuple[nn.Module, int]:
    """The model and its N of the FLOPs formula (every parameter but the embeddings)."""
    if arch == "ours":
        from scaleforge.models.llm.model import LLMModelConfig, Transformer

        cfg = LLMModelConfig(preset=None, vocab_size=dims["vocab"], dim=dims["dim"], n_layers=dims["n_layers"],
                             n_heads=dims["n_heads"], ffn_hidden=dims["ffn"], rope_theta=10000.0,
                             max_seq_len=max(seq, 2048), norm_eps=1e-5, qkv_bias=False, tied_embeddings=False,
                             seq_len=seq).resolved()
        model = Transformer(cfg)
        model.init_weights()
        return model, model.num_params(exclude_embedding=True)
    model = PlainLM(arch, seq=seq, **dims)
    emb = model.tok.weight.numel() + (model.pos.weight.numel() if model.pos is not None else 0)
    return model, sum(p.numel() for p in model.parameters()) - emb


def apply_float8(model: nn.Module) -> None:
    from torchao.float8 import convert_to_float8_training

    # every block linear (dims divisible by 16); the output projection stays bf16 (torchtitan's default)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn.startswith("layers."))


def init_dist() -> torch.device:
    if "RANK" not in os.environ:  # plain `python`: a one-process group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=tuple(DIMS), default="gpt")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--float8", action="store_true", help="torchao float8 training of the block linears")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny dims for a CPU smoke run")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many blocks")
    args = ap.parse_args()
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = init_dist()
    dims = dict(TINY if args.tiny else DIMS[args.arch])
    if args.layers:
        dims["n_layers"] = args.layers
    seq = 64 if args.tiny else args.seq
    torch.manual_seed(0)
    model, n_matmul = build_model(args.arch, dims, seq)
    model.to(device)
    if args.float8:
        apply_float8(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for blk in model.layers:
        if args.compile:
            blk.compile()
        fully_shard(blk, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    fpt = flops_per_token(n_matmul, dims["n_layers"], dims["n_heads"], dims["dim"] // dims["n_heads"], seq)
    gen = torch.Generator(device).manual_seed(1 + dist.get_rank())
    times, losses = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, dims["vocab"], (args.micro_batch, seq + 1), device=device, generator=gen)
        t0 = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the host waits for the step here, as a logging script does
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[args.warmup:])
    tps = args.micro_batch * seq / step
    res = {
        "arch": args.arch, "compile": args.compile, "float8": args.float8, "world": dist.get_world_size(),
        "params_matmul": n_matmul, "flops_per_token": fpt, "step_time_s": step,
        "tokens_per_s_per_gpu": tps, "mfu": mfu(tps, fpt), "final_loss": losses[-1],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
    }
    if not all(math.isfinite(x) for x in losses):
        res["error"] = "non-finite loss"
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
