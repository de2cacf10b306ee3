"""torchtitan (0.3.0) training lm_1b's model through torchtitan's own trainer, with this file as its config.

    torchrun --nproc-per-node 1 benchmarks/peers/torchtitan_lm_1b.py --steps 30 --warmup 10
    torchrun --nproc-per-node 1 -m torchtitan.train --module torchtitan_lm_1b --config lm_1b   # torchtitan's CLI

torchtitan 0.3.0 takes its configuration from a Python "config registry" (``--module`` / ``--config``), so this
module is one: ``lm_1b()`` returns a ``Trainer.Config`` with lm_1b's model (16 layers, dim 2048, 16 heads x 128,
SwiGLU 5632, vocab 50304, untied, RoPE theta 10000, RMSNorm eps 1e-5), seq 2048, local batch 4, bf16 FSDP2
(``mixed_precision_param=bfloat16``, fp32 reduce: torchtitan's default), per-block ``torch.compile`` of the
model and the loss, no activation checkpointing, fused AdamW (torchtitan's default implementation), no
checkpoints. Two things are torchtitan's own and stay so: its language models attend through FlexAttention with
a per-document causal mask (0.3.0 has no plain SDPA causal backend for them; every row here is one document, so
the mask is causal), and it fuses q/k/v into one projection. The data are random tokens (a tokenizer and
dataloader of this file: the GPU machines have no internet, and the number of tokens, not their text, sets the
cost).

Run as a script it calls torchtitan's trainer, times the steps itself (torchtitan's own metrics log at
``log_freq``), and prints a ``RESULT {json}`` line like ``naive_fsdp2.py``: median tokens/s/GPU after warm-up,
MFU by ``benchmarks/peers/flops.py`` and the peak of ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import default_adamw, LRSchedulersContainer
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.llama3 import Llama3Model, model_registry
from torchtitan.models.llama3 import _build_llama3_layers, _EMBEDDING_INIT, _NORM_INIT, _output_linear_init
from torchtitan.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torchtitan_common import RandomTokens, TokenIdsOnly, print_result  # noqa: E402

LM_1B = dict(n_layers=16, dim=2048, n_heads=16, vocab=50304, ffn=5632, seq=2048)
TINY = dict(n_layers=2, dim=64, n_heads=4, vocab=256, ffn=192, seq=64)


class RandomTokenizer(TokenIdsOnly, BaseTokenizer):
    """Stands in for a tokenizer: the data below are token ids already."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        vocab_size: int = LM_1B["vocab"]

    def __init__(self, config: Config, tokenizer_path: str | None = None, **kwargs):
        super().__init__()
        self.vocab_size = config.vocab_size


class RandomTokenDataLoader(ParallelAwareDataloader):
    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        pass

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer,
                 seq_len: int, local_batch_size: int, snapshot_every_n_steps: int | None = 1, **kwargs):
        data = RandomTokens(tokenizer.get_vocab_size(), seq_len, dp_rank, positions=True)
        super().__init__(data, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size,
                         num_workers=0)


def _model(d: dict) -> Llama3Model.Config:
    return Llama3Model.Config(
        dim=d["dim"], vocab_size=d["vocab"], enable_weight_tying=False,
        tok_embeddings=Embedding.Config(num_embeddings=d["vocab"], embedding_dim=d["dim"], param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=d["dim"], eps=1e-5, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=d["dim"], out_features=d["vocab"], param_init=_output_linear_init(d["dim"])),
        layers=_build_llama3_layers(
            n_layers=d["n_layers"], dim=d["dim"], n_heads=d["n_heads"], n_kv_heads=d["n_heads"], hidden_dim=d["ffn"],
            rope=ComplexRoPE.Config(dim=d["dim"] // d["n_heads"], max_seq_len=d["seq"], theta=10000.0),
            attn_backend="flex"),
    )


def lm_1b(dims: dict = LM_1B, steps: int = 30, micro_batch: int = 4, compile_: bool = True) -> Trainer.Config:
    spec = model_registry("debugmodel")
    spec.flavor, spec.model = "lm_1b", _model(dims)
    return Trainer.Config(
        model_spec=spec,
        tokenizer=RandomTokenizer.Config(vocab_size=dims["vocab"]),
        dataloader=RandomTokenDataLoader.Config(),
        loss=CrossEntropyLoss.Config(global_vocab_size=dims["vocab"]),
        optimizer=default_adamw(lr=3e-4),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=2),
        training=TrainingConfig(local_batch_size=micro_batch, seq_len=dims["seq"], steps=steps),
        parallelism=ParallelismConfig(),
        activation_checkpoint=None,  # no activation checkpointing, as lm_1b
        compile=CompileConfig(enable=compile_),
        metrics=MetricsProcessor.Config(log_freq=10),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny dims, compile off (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many blocks")
    args = ap.parse_args()
    dims = dict(TINY if args.tiny else LM_1B)
    if args.layers:
        dims["n_layers"] = args.layers
    config = lm_1b(dims, args.steps, args.micro_batch, compile_=not args.tiny)
    trainer = config.build()
    times: list[float] = []
    step_fn = trainer.train_step

    def timed_step(*a, **kw):
        t0 = time.perf_counter()
        out = step_fn(*a, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out

    trainer.train_step = timed_step
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0.0
    print_result("torchtitan", trainer.model_parts[0], dims, args.micro_batch, times, args.warmup, peak)
    trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
