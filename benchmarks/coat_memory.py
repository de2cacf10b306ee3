"""COAT FP8 training vs BF16 and torchao float8 on one GPU or, under torchrun, several (the COAT paper's reporting rule): peak allocated
and reserved memory with a breakdown (weights, optimizer states, gradients, activations), tokens/s at the same
micro-batch and at the largest micro-batch that fits, and a loss curve BF16 vs COAT.

Every mode runs as the engine trains: FSDP2 over the processes' GPUs (fully_shard per block, then the root), mixed
precision bf16 compute / fp32 master weights and reduction. Modes, one after another in this process:
  bf16       torch AdamW (fused, on the local shards as the platform's adamw), bf16 activations
  coat       scaleforge.fp8.convert_to_coat (FP8 linears + FP8-saved activations) + adamw_fp8 (fused kernel)
  coat_unfused   the same with adamw_fp8's unfused update (state codec kernels + torch's AdamW ops)
  ao_tensor  torchao float8 training, tensorwise scaling (convert_to_float8_training) + torch AdamW
  ao_row     torchao float8 training, rowwise scaling + torch AdamW
What stays in bf16 is the recipes' fp8_keep in every mode (LM: the output head; SANA: embedders, t_block,
proj_out). Models: the LLM recipe's Transformer; the SANA recipe's Linear DiT (1024 px = 32 x 32 latents of
DC-AE f32c32, 300 caption tokens; flow-matching MSE against random targets). "tokens" are latent tokens for SANA.

  python benchmarks/coat_memory.py --model llama2-7b-cut --layers 4 --seq 2048 --micro 1,2,4
  python benchmarks/coat_memory.py --model lm_1b --loss-steps 300      # + the loss curves (CSV)
  python benchmarks/coat_memory.py --model sana-1.6b --seq 1024 --micro 1,2,4
  python benchmarks/coat_memory.py --smoke                               # CPU, tiny shapes, torch kernels
  torchrun --nproc-per-node 4 benchmarks/coat_memory.py --model llama2-7b --micro 1,2,4,8   # COAT's 4-GPU setting

Under torchrun every rank trains its own random batch of --micro samples; tokens/s and memory are rank 0's
(per GPU; the ranks hold equal shards).

Breakdown columns (GiB): weights = fp32 master shards; optimizer = its state tensors; grads = fp32 gradient
shards after backward; activations = allocated memory added by the forward (saved activations plus the
gathered bf16 weights of the last block, which is not resharded); saved = the distinct storages autograd keeps
for backward (saved-tensor hooks, parameters excluded); peak_fwd / peak_bwd / peak_opt = the peak allocated
memory of each phase of the measured step (where the step's peak is); opt_ms = that step's optimizer step time
(synchronized, not in the tokens/s steps). peak_alloc / peak_reserved = the timed
steps' peak. The LM's loss is its head's summed cross-entropy (``model(ids, labels=...)``): with
``--kernels triton`` (the GPU default) the fused linear + cross-entropy, in every mode.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

from scaleforge import fp8 as coat
from scaleforge.models.llm.model import LLMModelConfig, Transformer
from scaleforge.platform.optim import ShardLocalAdamW
from scaleforge.platform.optim.adamw_fp8 import AdamWFP8

MODELS = {
    # Llama-2-7B's layer shape (d 4096, SwiGLU 11008, 32 heads, vocab 32000), cut to --layers
    "llama2-7b-cut": dict(vocab_size=32000, dim=4096, n_heads=32, n_kv_heads=32, ffn_hidden=11008),
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_heads=32, n_kv_heads=32, ffn_hidden=11008, n_layers=32),
    "lm_1b": dict(vocab_size=50304, dim=2048, n_heads=16, n_kv_heads=16, ffn_hidden=5632, n_layers=16),
    "smoke": dict(vocab_size=256, dim=64, n_heads=4, n_kv_heads=4, ffn_hidden=128, n_layers=2),
    "sana-1.6b": dict(preset="1.6b"),
    "sana-smoke": dict(preset="tiny"),
}
LM_KEEP = ("output",)
SANA_KEEP = ("patch_embed", "t_embedder", "t_block", "caption_projection", "proj_out")
GIB = 2**30


def _model(name: str, layers: int | None, seq: int, device, kernels: str = "torch") -> torch.nn.Module:
    arch = dict(MODELS[name])
    torch.manual_seed(0)
    if name.startswith("sana"):
        from scaleforge.models.sana.model import SanaTransformer, preset_arch

        with torch.device(device):
            model = SanaTransformer(preset_arch(arch["preset"], depth=layers))
    else:
        if layers:
            arch["n_layers"] = layers
        cfg = LLMModelConfig(preset=None, rope_theta=10000.0, max_seq_len=max(seq, 2048), norm_eps=1e-5,
                             qkv_bias=False, tied_embeddings=False, seq_len=seq, kernels=kernels, **arch).resolved()
        with torch.device(device):
            model = Transformer(cfg)
    model.init_weights()
    return model


def build(name: str, layers: int | None, seq: int, mode: str, device,
          kernels: str = "torch") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model(name, layers, seq, device, kernels)
    keep = SANA_KEEP if name.startswith("sana") else LM_KEEP
    if mode.startswith("coat"):
        coat.convert_to_coat(model, keep)
    elif mode.startswith("ao_"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        recipe = "tensorwise" if mode == "ao_tensor" else "rowwise"
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                   module_filter_fn=lambda m, fqn: _ao_eligible(m, fqn, keep))
    _shard(model)
    hp = dict(lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    if mode.startswith("coat"):
        # fused: one kernel per parameter's update on the GPU (optim.fused, as configs/lm_1b.yaml sets it)
        return model, AdamWFP8(model.parameters(), fused=mode == "coat" and device.type == "cuda", **hp)
    return model, ShardLocalAdamW(model.parameters(), fused=device.type == "cuda", **hp)


#: torchao float8 also multiplies over the token dimension (the weight gradient): SANA's cross-attention k/v
#: projection sees the 300 caption tokens per image, not a multiple of 16 at odd micro-batches
AO_TOKEN_DIM_KEEP = ("cross_attn.kv_linear",)


def _ao_eligible(module: torch.nn.Module, fqn: str, keep: tuple[str, ...]) -> bool:
    """torchao's float8 GEMMs need every multiplied dimension divisible by 16; the same modules stay high precision
    as in COAT mode."""
    dims_ok = not isinstance(module, torch.nn.Linear) or (module.in_features % 16 == 0
                                                           and module.out_features % 16 == 0)
    return dims_ok and not any(fqn.startswith(k) for k in keep) and not fqn.endswith(AO_TOKEN_DIM_KEEP)


def _shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = list(model.blocks if hasattr(model, "blocks") else model.layers)
    for i, b in enumerate(blocks):
        fully_shard(b, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)


def _loss(model, batch) -> torch.Tensor:
    if isinstance(batch, dict):  # SANA: velocity target for noised latents
        out = model(batch["latents"], batch["t"], batch["text"])
        return torch.nn.functional.mse_loss(out.float(), batch["target"])
    # the LM head's loss path: fused linear + cross-entropy with model.kernels=triton (chunks of logits), the
    # full-logits fp32 reference otherwise; the same in every mode
    return model(batch[:, :-1], labels=batch[:, 1:]) / batch[:, 1:].numel()


def make_batch(model, micro: int, seq: int, device, g) -> torch.Tensor | dict:
    if hasattr(model, "arch"):  # SANA: seq latent tokens = a square latent of side sqrt(seq)
        side = int(round(seq ** 0.5))
        a = model.arch
        r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
        return dict(latents=r(micro, a.in_channels, side, side), t=torch.rand(micro, device=device, generator=g),
                    text=r(micro, a.text_len, a.caption_channels), target=r(micro, a.in_channels, side, side))
    return torch.randint(0, model.cfg.vocab_size, (micro, seq + 1), device=device, generator=g)


def step(model, opt, batch, marks: dict | None = None, clip: float | None = None) -> float:
    """One training step; with ``marks`` also the breakdown: activations (allocated memory the forward adds),
    saved (the distinct storages autograd keeps for backward, parameters excluded), grads, and the peak of each
    phase (forward, backward, optimizer step) to show where the step's peak is."""
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    mem = torch.cuda.memory_allocated if cuda else (lambda: 0)

    def phase(name):
        if marks is not None and cuda:
            marks[f"peak_{name}"] = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()

    if marks is not None and cuda:
        torch.cuda.reset_peak_memory_stats()
    before = mem()
    if marks is not None:
        from scaleforge.platform.memory import saved_tensor_bytes

        out = []
        marks["saved"] = saved_tensor_bytes(lambda: out.append(_loss(model, batch)), model) / GIB
        loss = out[0]
        marks["activations"] = (mem() - before) / GIB
    else:
        loss = _loss(model, batch)
    phase("fwd")
    loss.backward()
    phase("bwd")
    if marks is not None:
        marks["grads"] = sum(g.numel() * g.element_size() for g in (getattr(p.grad, "_local_tensor", p.grad)
                                                                     for p in model.parameters())) / GIB
    if marks is not None and cuda:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if marks is not None and cuda:
        torch.cuda.synchronize()
        marks["opt_ms"] = 1e3 * (time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    phase("opt")
    return loss.item()


def optimizer_bytes(opt) -> float:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) for t in [getattr(v, "_local_tensor", v)]) / GIB


def measure(args, mode: str, micro: int, device) -> dict:
    cuda = device.type == "cuda"
    # the previous point's model and optimizer sit in reference cycles (FSDP's hooks): collect them first, or
    # their memory counts towards this point's peak
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    leftover = torch.cuda.memory_allocated() / GIB if cuda else 0.0
    model, opt = build(args.model, args.layers, args.seq, mode, device, args.kernels)
    weights = sum(t.numel() * t.element_size() for p in model.parameters()
                  for t in [getattr(p, "_local_tensor", p)]) / GIB
    g = torch.Generator(device=device).manual_seed(1 + torch.distributed.get_rank())
    ids = make_batch(model, micro, args.seq, device, g)
    marks: dict = {f"peak_{k}": float("nan") for k in ("fwd", "bwd", "opt")} | {"opt_ms": float("nan")}
    step(model, opt, ids)  # states exist after the first step
    step(model, opt, ids, marks)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(model, opt, ids)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    out = dict(mode=mode, micro=micro, leftover=leftover, weights=weights, optimizer=optimizer_bytes(opt), **marks,
               tokens_per_s=micro * args.seq / dt,
               peak_alloc=torch.cuda.max_memory_allocated() / GIB if cuda else float("nan"),
               peak_reserved=torch.cuda.max_memory_reserved() / GIB if cuda else float("nan"))
    del model, opt
    return out


def loss_curve(args, mode: str, device) -> list[float]:
    if args.model.startswith("sana"):
        raise SystemExit("--loss-steps: the loss curve is for the LM models")
    model, opt = build(args.model, args.layers, args.seq, mode, device, args.kernels)
    g = torch.Generator(device=device).manual_seed(2)
    # lm_1b's schedule shape: linear warm-up (a tenth of the run) and clipping at 1.0; without them a 1B model at
    # 3e-4 leaves the uniform-loss plateau late or not at all, and the curves compare nothing
    warmup = max(1, args.loss_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    # a learnable synthetic language: rows are random sequences of phrases from a fixed pool of 512 phrases of 16
    # tokens, so that the loss falls from ln(vocab) towards ln(512)/16 per token as the pool is learnt
    pool = torch.randint(0, model.cfg.vocab_size, (512, 16), device=device, generator=g)
    n_phrases = args.seq // 16 + 1
    losses = []
    for _ in range(args.loss_steps):
        pick = torch.randint(0, 512, (args.loss_micro, n_phrases), device=device, generator=g)
        ids = pool[pick].flatten(1)[:, :args.seq + 1]
        losses.append(step(model, opt, ids, clip=1.0))
        sched.step()
    return losses


def _failed_anywhere(failed: bool, device) -> bool:
    """Under torchrun: whether any rank failed this point (so that all ranks go on to the same next one)."""
    if torch.distributed.get_world_size() == 1:
        return failed
    flag = torch.tensor([float(failed)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b-cut", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", default="1,2,4", help="micro-batches to try per mode (an OOM ends that mode's list)")
    ap.add_argument("--modes", default="bf16,coat,ao_tensor,ao_row")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per point")
    ap.add_argument("--loss-steps", type=int, default=0, help="> 0: also train BF16 and COAT this many steps")
    ap.add_argument("--loss-micro", type=int, default=2)
    ap.add_argument("--loss-csv", default=None)
    ap.add_argument("--kernels", default=None, choices=("torch", "triton"),
                    help="the LM's model.kernels in every mode (default: triton on GPU: fused RMSNorm, SwiGLU, "
                         "linear + cross-entropy for BF16; the same head for COAT)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, torch reference kernels")
    args = ap.parse_args()
    if args.smoke:
        args.model = "sana-smoke" if args.model.startswith("sana") else "smoke"
        args.seq, args.micro, args.steps, args.modes = 64, "1,2", 1, "bf16,coat"
        args.loss_steps = min(args.loss_steps, 3)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.kernels is None:
        args.kernels = "triton" if device.type == "cuda" else "torch"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    from scaleforge.platform.dist import _free_port

    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:  # torchrun
        torch.distributed.init_process_group(backend)
    else:
        torch.distributed.init_process_group(backend, rank=0, world_size=1,
                                             init_method=f"tcp://127.0.0.1:{_free_port()}")
    world = torch.distributed.get_world_size()
    if torch.distributed.get_rank() != 0:  # rank 0 prints the table
        sys.stdout = open(os.devnull, "w")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {args.model} layers={args.layers or 'preset'} seq={args.seq} kernels={args.kernels} on {world} x {name} "
          f"(FSDP2 over {world}; per-GPU figures)")
    cols = ("mode", "micro", "leftover", "peak_alloc", "peak_reserved", "weights", "optimizer", "grads", "activations",
            "saved", "peak_fwd", "peak_bwd", "peak_opt", "opt_ms", "tokens_per_s")
    print(" | ".join(f"{c:>13}" for c in cols))
    for mode in args.modes.split(","):
        for micro in map(int, args.micro.split(",")):
            r, why = None, None
            try:
                r = measure(args, mode, micro, device)
            except torch.OutOfMemoryError:
                why = f"{micro:>13} | OOM"
            except ImportError as e:
                why = f"unavailable ({e})"
            except Exception as e:  # one failing mode must not hide the others' rows
                why = f"{micro:>13} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if _failed_anywhere(why is not None, device) and why is None:
                why = f"{micro:>13} | failed on another rank (OOM there?)"
            if why is not None:  # every rank ends this mode's list together
                print(f"{mode:>13} | {why}", flush=True)
                break
            print(" | ".join(f"{r[c]:>13.3f}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in cols), flush=True)
    if args.loss_steps:
        curves = {m: loss_curve(args, m, device) for m in ("bf16", "coat")}
        for n in sorted({10, max(10, args.loss_steps // 6)}):  # the last steps alone are noisy at a low loss
            last = {m: sum(c[-n:]) / len(c[-n:]) for m, c in curves.items()}
            print(f"loss (mean of the last {n} of {args.loss_steps} steps): bf16 {last['bf16']:.4f} "
                  f"coat {last['coat']:.4f} delta {100 * (last['coat'] - last['bf16']) / last['bf16']:+.2f}%")
        if args.loss_csv:
            with open(args.loss_csv, "w") as f:
                f.write("step,bf16,coat\n")
                for i, (a, b) in enumerate(zip(curves["bf16"], curves["coat"]), 1):
                    f.write(f"{i},{a},{b}\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
