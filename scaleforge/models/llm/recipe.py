"""The ``llm`` recipe: a dense Llama / Qwen2-style decoder trained on token sequences.

FLOPs per sample (torchtitan convention)::

    flops_per_sample = 6 * N * S + 12 * L * H * d_head * S^2

with ``S`` = ``model.seq_len`` tokens per sample, ``L`` layers, ``H`` query heads of size ``d_head``
and ``N`` the parameters that take part in matrix multiplies: all parameters except the token
embedding (a lookup), but including the output projection (counted even when tied to the embedding).
The attention term is not halved for causality. Llama-3-8B at S=8192: 6*7.50e9 + 12*32*4096*8192 =
57.9 GFLOP/token, the figure of platforms.md. The "1b" preset at S=2048: 6.35 GFLOP/token (platforms.md
section 3 implies ~6.4 for its 0.94B GPT-style model).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge.models.llm.data import IGNORE_INDEX, SyntheticTokenStream, decode_token_sample
from scaleforge.models.llm.hf import export_hf, load_hf_weights
from scaleforge.models.llm.model import LLMModelConfig, Transformer
from scaleforge.platform.recipe import DataContext, LossOutput, ParallelPlan, Recipe, TensorParallelPlan
from scaleforge.platform.tensor_parallel import vocab_parallel_group, vocab_parallel_summed_cross_entropy


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32, summed over tokens whose (unshifted) label is not -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def decoder_tensor_parallel_plan(cfg: LLMModelConfig, prefix: str = "", seq_len: int | None = None) -> TensorParallelPlan:
    """Megatron's layout of the decoder (``Transformer``) at module path ``prefix``: q/k/v and gate/up
    column-parallel, attention output and down row-parallel (each block: one all-gather and one reduce-scatter
    per sublayer), vocabulary-parallel embedding and output projection, norms on 1/tp of the tokens.
    ``seq_len``: the fixed tokens per row, checked for divisibility (None: the data pads its rows).
    ``model.kernels=triton`` keeps its RMSNorm (on the rank's tokens) and SwiGLU (on the rank's features)
    kernels; the output head's fused linear + cross-entropy gives way to the vocabulary-parallel head, which
    computes the loss from its logits slice (called with labels, as ``OutputProjection`` is)."""
    blocks = f"{prefix}layers.*"
    return TensorParallelPlan(
        column=tuple(f"{blocks}.{m}" for m in ("attention.wq", "attention.wk", "attention.wv",
                                              "feed_forward.w1", "feed_forward.w3")),
        row=(f"{blocks}.attention.wo", f"{blocks}.feed_forward.w2"),
        vocab_embedding=f"{prefix}tok_embeddings", vocab_output=f"{prefix}output",
        sequence_entry=f"{prefix}layers.0",
        sequence_gather=(f"{blocks}.attention", f"{blocks}.feed_forward", f"{prefix}output"),
        head_attrs={f"{blocks}.attention": ("n_heads", "n_kv_heads")},
        sequence_modules=(blocks, f"{prefix}norm"),
        sequence_length=seq_len,
    )


class LLMRecipe(Recipe):
    name = "llm"
    config_class = LLMModelConfig

    def __init__(self, model_cfg: LLMModelConfig, job_cfg: Any):
        # Fill architecture fields (preset / init_from's config.json) once; ``self.cfg`` is complete.
        super().__init__(model_cfg.resolved(), job_cfg)
        # Under parallel.compile the loss is compiled too (as torchtitan does): Inductor fuses the
        # shift, the fp32 upcast and the log-softmax over the vocabulary into one pass over the bf16
        # logits instead of materializing fp32 copies of a (tokens x vocab) tensor.
        compile_loss = bool(getattr(getattr(job_cfg, "parallel", None), "compile", False))
        self._loss_fn = torch.compile(summed_cross_entropy) if compile_loss else summed_cross_entropy

    # -- model -----------------------------------------------------------------------------------
    def build_model(self, device: torch.device) -> nn.Module:
        with torch.device(device):
            return Transformer(self.cfg)

    def init_weights(self, model: nn.Module) -> None:
        model.init_weights()

    def load_pretrained(self, model: nn.Module, path: str) -> None:
        load_hf_weights(model, path)

    def parallel_plan(self, model: nn.Module) -> ParallelPlan:
        """Each block is an FSDP unit (and the unit of activation checkpointing / compile). Untied
        embedding and output projection are units of their own (large vocabularies: 0.5-1 GB each at
        7-8B); tied, they share one parameter and stay together in the root."""
        blocks = list(model.layers)
        units: list[nn.Module] = list(blocks)
        if not self.cfg.tied_embeddings:
            units = [model.tok_embeddings] + units + [model.output]
        # COAT: the output head stays in high precision (coat.md §1; the loss is sensitive to its rounding)
        return ParallelPlan(fsdp_units=units, checkpoint_units=blocks, fp8_keep=("output",))

    def tensor_parallel_plan(self, model: nn.Module) -> TensorParallelPlan:
        return decoder_tensor_parallel_plan(self.cfg, seq_len=self.cfg.seq_len)

    # -- data and loss -----------------------------------------------------------------------------
    def build_data(self, ctx: DataContext):
        data = self.job_cfg.data
        if data.kind == "synthetic":
            return SyntheticTokenStream(self.cfg.vocab_size, self.cfg.seq_len, ctx.micro_batch_size,
                                        ctx.seed, ctx.dp_rank, ctx.dp_world_size, data.synthetic_samples)
        if data.kind == "webdataset":
            from scaleforge.platform.config import ConfigError

            try:
                from scaleforge.platform.data import PackingBatcher, build_loader
            except ImportError as e:
                raise ConfigError(
                    f"data.kind=webdataset: the platform's webdataset loader is not available ({e})"
                ) from None
            # Token samples (tokens.npy) packed into rows of seq_len with per-sample positions and
            # document ids, so attention never crosses samples (see docs/data.md).
            return build_loader(
                data, ctx,
                sample_fn=functools.partial(decode_token_sample, vocab_size=self.cfg.vocab_size),
                batcher=PackingBatcher(max_len=self.cfg.seq_len, rows=ctx.micro_batch_size,
                                       ignore_index=IGNORE_INDEX),
            )
        from scaleforge.platform.config import ConfigError

        raise ConfigError(f"data.kind: {data.kind!r} is not supported by the llm recipe (synthetic | webdataset)")

    def forward_loss(self, model: nn.Module, batch: Mapping[str, Any]) -> LossOutput:
        """Summed next-token cross-entropy (fp32) over tokens whose label is not -100; labels are
        aligned with inputs (HF convention) and shifted here. Packed batches (``seq_ids`` from the
        PackingBatcher, or ``document_ids``) attend within each sample only."""
        input_ids = batch["input_ids"]
        labels = batch.get("labels", input_ids)
        docs = batch.get("document_ids", batch.get("seq_ids"))
        if self.cfg.kernels == "triton":  # the fused, chunked head + loss: no full logits
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]
            loss = model(input_ids, position_ids=batch.get("position_ids"), document_ids=docs, labels=targets)
        else:
            logits = model(input_ids, position_ids=batch.get("position_ids"), document_ids=docs)
            tp_group = vocab_parallel_group(model)
            if tp_group is None:
                loss = self._loss_fn(logits, labels)
            else:  # parallel.tp > 1: the logits are this rank's slice of the vocabulary
                loss = vocab_parallel_summed_cross_entropy(logits, labels, tp_group, IGNORE_INDEX)
        num_items = (labels[:, 1:] != IGNORE_INDEX).sum()
        return LossOutput(loss=loss, num_items=num_items, num_tokens=int(input_ids.numel()))

    # -- accounting --------------------------------------------------------------------------------
    def matmul_params(self) -> int:
        """N of the FLOP formula: every parameter except the embedding, output projection included."""
        c = self.cfg
        hd = c.head_dim
        attn = c.dim * hd * (c.n_heads + 2 * c.n_kv_heads) + c.n_heads * hd * c.dim
        if c.qkv_bias:
            attn += hd * (c.n_heads + 2 * c.n_kv_heads)
        block = attn + 3 * c.dim * c.ffn_hidden + 2 * c.dim
        return c.n_layers * block + c.dim + c.vocab_size * c.dim

    def flops_per_sample(self, batch: Mapping[str, Any] | None = None) -> float:
        """6*N*S + 12*L*H*d_head*S^2 (see the module docstring)."""
        c = self.cfg
        s = c.seq_len if batch is None else int(batch["input_ids"].shape[1])
        return 6.0 * self.matmul_params() * s + 12.0 * c.n_layers * c.n_heads * c.head_dim * s * s

    activation_fp8_modes = ("coat",)

    def activation_bytes(self, micro_batch_size: int, activation_checkpointing: bool,
                         compiled: bool = False, fp8: str = "none", tp: int = 1) -> int:
        """Activation memory of one micro-batch, measured rather than guessed: probe forwards of this
        architecture (real width, 1-2 layers, small vocabularies, ``probe`` tokens, bf16, on CPU)
        give the bytes autograd saves per token for one block and per token per vocabulary entry
        (logits, fp32 log-softmax); both scale linearly in tokens with SDPA's flash / memory-efficient
        kernels. The loss backward adds a transient logits gradient (fp32 + bf16 eager; bf16 alone
        when the loss is compiled, which fuses the upcast). With activation checkpointing a block
        keeps only its input, plus one block's activations during recompute.

        ``compiled``: the blocks and the loss are traced as the engine compiles them and partitioned
        by AOTAutograd's min-cut partitioner (Inductor's), without Inductor's code generation
        (backend ``aot_eager_decomp_partition``), so the probe counts what the compiled run saves.

        ``fp8="coat"``: the probe model is converted as the engine converts it (``convert_to_coat`` with the
        plan's ``fp8_keep``) and runs the kernel library's torch references, which save what the GPU kernels
        save (FP8 codes and scales), so the probe counts COAT's saved activations."""
        import dataclasses

        from scaleforge.kernels import use_backend
        from scaleforge.platform.memory import saved_tensor_bytes

        c = self.cfg
        probe = min(c.seq_len, 64)
        backend = "aot_eager_decomp_partition" if compiled else None

        def measure(layers: int, vocab: int) -> int:
            cfg = dataclasses.replace(c, n_layers=layers, vocab_size=vocab, tied_embeddings=False)
            with torch.device("cpu"):
                model = Transformer(cfg).to(torch.bfloat16)
            if fp8 == "coat":
                from scaleforge.fp8 import convert_to_coat

                convert_to_coat(model, self.parallel_plan(model).fp8_keep)
            loss_fn = summed_cross_entropy
            if backend:
                for block in model.layers:
                    block.compile(backend=backend)
                loss_fn = torch.compile(summed_cross_entropy, backend=backend)
            ids = torch.randint(0, vocab, (1, probe))
            with use_backend("torch"):  # CPU tensors, also on a GPU machine
                return saved_tensor_bytes(lambda: loss_fn(model(ids), ids), params=model.parameters())

        base, two_layers, wide_vocab = measure(1, 256), measure(2, 256), measure(1, 512)
        per_block = (two_layers - base) / probe
        per_vocab = (wide_vocab - base) / probe / 256
        tokens = micro_batch_size * c.seq_len
        logits = tokens * c.vocab_size * (per_vocab + (2 if compiled else 4 + 2))  # saved + transient gradient
        if c.kernels == "triton" and tp == 1:  # fused head: one chunk of bf16 logits, plus dx and dweight kept for backward
            from scaleforge.kernels.fused_linear_cross_entropy import default_chunk

            logits = 2 * (default_chunk(tokens, c.dim, c.vocab_size) * c.vocab_size + tokens * c.dim + c.vocab_size * c.dim)
        if activation_checkpointing:
            blocks = tokens * (c.n_layers * 2 * c.dim + per_block)
        else:
            blocks = tokens * c.n_layers * per_block
        # tp > 1: sequence parallelism splits what the tp layers do not (norms, residual stream), the head
        # splits the vocabulary (no fused head: the vocabulary-parallel one): about 1/tp of tp = 1's
        # (Korthikanti et al., 2022)
        return int((blocks + logits + tokens * 2 * c.dim) / tp)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        c = self.cfg
        emb = c.vocab_size * c.dim
        total = self.matmul_params() + emb - (emb if c.tied_embeddings else 0)
        per_block = (self.matmul_params() - c.dim - c.vocab_size * c.dim) // c.n_layers
        return {
            "architecture": (f"{c.n_layers} layers, dim {c.dim}, {c.n_heads} heads / {c.n_kv_heads} kv "
                             f"heads x {c.head_dim}, SwiGLU {c.ffn_hidden}, vocab {c.vocab_size}, "
                             f"{'qkv bias, ' if c.qkv_bias else ''}{'tied' if c.tied_embeddings else 'untied'} "
                             f"embeddings, rope theta {c.rope_theta:g} ({c.rope_type})"),
            "parameters": total,
            "parameters (embedding)": emb,
            "parameters (per block)": per_block,
            "parameters (blocks)": per_block * c.n_layers,
            "parameters (output)": 0 if c.tied_embeddings else emb,
            "tokens per sample": c.seq_len,
            "FLOPs per token (6N + 12*L*H*dh*S)": self.flops_per_sample() / c.seq_len,
            "init_from": c.init_from or "random (init_weights)",
        }

    # -- export --------------------------------------------------------------------------------------
    def export_formats(self) -> tuple[str, ...]:
        return ("hf",)

    def export(self, state_dict: Mapping[str, torch.Tensor], out_dir: str, fmt: str) -> None:
        if fmt != "hf":
            return super().export(state_dict, out_dir, fmt)
        export_hf(state_dict, self.cfg, out_dir)
