"""torchtitan (0.2.2) training lm_1b's model through torchtitan's own trainer, with this file as its train spec.

    torchrun --nproc-per-node 1 benchmarks/peers/torchtitan022_lm_1b.py --steps 30 --warmup 10
    python benchmarks/peers/torchtitan022_lm_1b.py --meta        # config and model on meta only, no GPU needed
    PYTHONPATH=benchmarks/peers torchrun --nproc-per-node 1 -m torchtitan.train \\
        --experimental.custom_import torchtitan022_lm_1b --model.name scaleforge_lm_1b --model.flavor lm_1b ...
                                                                  # torchtitan's CLI: the rest as in job_args()

torchtitan 0.2.2 is the release that runs on torch 2.11 (0.3.0 imports FSDP names only newer torch nightlies
have). It names its models by "train spec", so importing this module registers one, ``scaleforge_lm_1b``:
llama3's own spec (model class, ``parallelize_llama``, optimizers, LR schedulers, cross-entropy loss, pipelining)
with a flavor ``lm_1b`` = ``TransformerModelArgs`` with lm_1b's model (16 layers, dim 2048, 16 heads x 128,
SwiGLU 5632 from torchtitan's own 4 x dim x 2/3 rounded up to 256, vocab 50304, untied, RoPE theta 10000 without
llama3.1's frequency scaling, RMSNorm eps 1e-5, causal SDPA attention: 0.2.2's default ``attn_type``), a
``tiny`` flavor for CPU-sized checks, and a tokenizer and dataloader of random tokens (the GPU machines have no
internet, and the number of tokens, not their text, sets the cost). The job config comes from torchtitan's own
``ConfigManager`` with command-line arguments (``job_args``): seq 2048, local batch 4, fp32 parameters computed
in bf16 (``mixed_precision_param=bfloat16``, fp32 gradient reduce: torchtitan's defaults), data-parallel shard
degree -1 (every rank), per-block ``torch.compile`` of the model and of the loss, no activation checkpointing,
fused AdamW lr 3e-4 (torchtitan's default implementation, weight decay 0.1) after a 2-step warm-up, no
checkpoints. What stays torchtitan's own: on one GPU its shard degree is 1, so it applies no ``fully_shard`` and
trains under bf16 autocast instead; with several GPUs it shards with FSDP2 and bf16 parameters. q, k and v are
three projections.

Run as a script it builds the config and, on the meta device, the model through the spec as torchtitan's
trainer does, and checks it against lm_1b (SwiGLU hidden 5632, 1,028,196,352 parameters); then it calls
torchtitan's trainer, times the steps itself (torchtitan's own metrics log at ``log_freq``), and prints a
``RESULT {json}`` line like ``naive_fsdp2.py``: median tokens/s/GPU after warm-up, MFU by
``benchmarks/peers/flops.py`` and the peak of ``torch.cuda.max_memory_allocated`` over the run. Without a GPU it
stops after the check: 0.2.2's trainer takes CUDA for its device whenever no accelerator is found.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import ConfigManager, JobConfig, TORCH_DTYPE_MAP
from torchtitan.models import llama3
from torchtitan.models.llama3 import TransformerModelArgs
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec
from torchtitan.tools.logging import init_logger
from torchtitan.tools.utils import set_default_dtype
from torchtitan.train import Trainer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from torchtitan_common import RandomTokens, TokenIdsOnly, print_result  # noqa: E402

SPEC_NAME = "scaleforge_lm_1b"
#: the parameters of scaleforge's lm_1b (tests/benchmarks/test_peers.py counts the same model)
LM_1B_PARAMS = 1_028_196_352
LM_1B = dict(n_layers=16, dim=2048, n_heads=16, vocab=50304, ffn=5632, seq=2048)
TINY = dict(n_layers=2, dim=64, n_heads=4, vocab=256, ffn=192, seq=64)
DIMS = {"lm_1b": LM_1B, "tiny": TINY}


def _model_args(d: dict, multiple_of: int) -> TransformerModelArgs:
    # torchtitan sizes SwiGLU itself (4 * dim * 2/3, rounded up to multiple_of); _check_model asserts d["ffn"]
    return TransformerModelArgs(
        dim=d["dim"], n_layers=d["n_layers"], n_heads=d["n_heads"], n_kv_heads=d["n_heads"], vocab_size=d["vocab"],
        multiple_of=multiple_of, ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000,
        rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0),  # factor 1: plain RoPE, as lm_1b
        max_seq_len=d["seq"], attn_type="sdpa", attn_mask_type="causal")


#: the spec's flavors; the dict itself is the spec's, so ``--layers`` cuts a flavor in place
MODEL_ARGS = {"lm_1b": _model_args(LM_1B, multiple_of=256), "tiny": _model_args(TINY, multiple_of=64)}


class RandomTokenizer(TokenIdsOnly, BaseTokenizer):
    """Stands in for a tokenizer: the data below are token ids already."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size


def build_random_tokenizer(job_config: JobConfig) -> RandomTokenizer:
    return RandomTokenizer(MODEL_ARGS[job_config.model.flavor].vocab_size)


def build_random_dataloader(dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer, job_config: JobConfig,
                            **kwargs) -> ParallelAwareDataloader:
    return ParallelAwareDataloader(
        RandomTokens(tokenizer.get_vocab_size(), job_config.training.seq_len, dp_rank), dp_rank=dp_rank,
        dp_world_size=dp_world_size, batch_size=job_config.training.local_batch_size, num_workers=0)


# validator and state-dict adapter off: validation would read an HF dataset, and nothing is saved or loaded
register_train_spec(SPEC_NAME, dataclasses.replace(
    llama3.get_train_spec(), model_args=MODEL_ARGS, build_dataloader_fn=build_random_dataloader,
    build_tokenizer_fn=build_random_tokenizer, build_validator_fn=None, state_dict_adapter=None))


def job_args(flavor: str = "lm_1b", steps: int = 30, micro_batch: int = 4, compile_: bool = True) -> list[str]:
    """lm_1b's run as torchtitan command-line arguments (``--section.key value``)."""
    return [
        "--model.name", SPEC_NAME, "--model.flavor", flavor,
        # nothing is read from it (random tokens, no checkpoint); an existing path keeps ConfigManager from warning
        "--model.hf_assets_path", str(HERE),
        # torchtitan keeps its flight-recorder traces under the dump folder; nothing of this run is kept
        "--job.dump_folder", os.path.join(tempfile.gettempdir(), SPEC_NAME),
        "--training.seq_len", str(DIMS[flavor]["seq"]), "--training.local_batch_size", str(micro_batch),
        "--training.steps", str(steps),
        "--training.mixed_precision_param", "bfloat16", "--training.mixed_precision_reduce", "float32",
        "--parallelism.data_parallel_shard_degree", "-1",
        "--activation_checkpoint.mode", "none",  # torchtitan's default is selective; lm_1b recomputes nothing
        "--compile.enable" if compile_ else "--compile.no-enable", "--compile.components", "model,loss",
        "--optimizer.name", "AdamW", "--optimizer.lr", "3e-4", "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.no-enable",
        "--metrics.log_freq", "10",
    ]


def _check_model(config: JobConfig, n_layers_cut: bool) -> dict:
    """The model as torchtitan's trainer builds it (meta device, the spec's flavor), checked against lm_1b."""
    spec = get_train_spec(config.model.name)
    model_args = spec.model_args[config.model.flavor]
    model_args.update_from_config(config)
    with torch.device("meta"), set_default_dtype(TORCH_DTYPE_MAP[config.training.dtype]):
        model = spec.model_cls(model_args)
    d = DIMS[config.model.flavor]
    hidden = model.layers["0"].feed_forward.w1.out_features
    assert hidden == d["ffn"], f"torchtitan sized SwiGLU {hidden}, the flavor's is {d['ffn']}"
    n_params = sum(p.numel() for p in model.parameters())
    if config.model.flavor == "lm_1b" and not n_layers_cut:
        assert n_params == LM_1B_PARAMS, f"{n_params:,} parameters, lm_1b has {LM_1B_PARAMS:,}"
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    return {"stack": "torchtitan 0.2.2", "flavor": config.model.flavor, "n_layers": model_args.n_layers,
            "ffn_hidden": hidden, "params": n_params, "params_matmul": n_matmul}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny dims, compile off (CPU-sized)")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many blocks")
    ap.add_argument("--meta", action="store_true", help="build the config and the model on meta, check, stop")
    args = ap.parse_args()
    init_logger()
    flavor = "tiny" if args.tiny else "lm_1b"
    if args.layers:
        MODEL_ARGS[flavor] = dataclasses.replace(MODEL_ARGS[flavor], n_layers=args.layers)
    config = ConfigManager().parse_args(job_args(flavor, args.steps, args.micro_batch, compile_=not args.tiny))
    check = _check_model(config, n_layers_cut=bool(args.layers))
    if args.meta or not torch.cuda.is_available():
        print("META " + json.dumps(check), flush=True)
        if not args.meta:
            raise RuntimeError("torchtitan 0.2.2's trainer needs a CUDA device (it picks cuda when none is found)")
        return

    trainer = Trainer(config)
    times: list[float] = []
    peaks: list[int] = []
    step_fn = trainer.train_step
    monitor = trainer.metrics_processor.device_memory_monitor
    reset_peak = monitor.reset_peak_stats

    def timed_step(*a, **kw):
        t0 = time.perf_counter()
        out = step_fn(*a, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out

    def read_then_reset_peak():
        # torchtitan resets the peak at every log, so the run's peak is the largest read before a reset
        peaks.append(torch.cuda.max_memory_allocated())
        reset_peak()

    trainer.train_step = timed_step
    monitor.reset_peak_stats = read_then_reset_peak
    try:
        trainer.train()
    finally:
        trainer.close()
    dims = {**DIMS[flavor], "n_layers": MODEL_ARGS[flavor].n_layers}
    print_result("torchtitan 0.2.2", trainer.model_parts[0], dims, args.micro_batch, times, args.warmup,
                 max(peaks + [torch.cuda.max_memory_allocated()]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
