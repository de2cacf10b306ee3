"""Tiny random conditioning models for the ``tiny`` preset: a 2-layer Gemma-2 text encoder (32 channels,
character-level tokenizer) and a 6-stage DC-AE with 32 latent channels (f32, like the released f32c32).

They exist so that ``scaleforge sana precompute`` and ``sample`` run end to end offline on CPU with
``configs/sana_tiny.yaml``; their weights are random (seeded), so the images mean nothing. A config names them
as ``model.text_encoder: tiny-gemma2`` and ``model.vae: tiny-dc-ae``; the first use builds them and saves
them in the transformers / diffusers formats under ``$SCALEFORGE_CACHE`` (default ``~/.cache/scaleforge``),
and every later load goes through ``from_pretrained`` like a released model.
"""
from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

TINY_TEXT_ENCODER = "tiny-gemma2"
TINY_VAE = "tiny-dc-ae"
_SEED = 0
_VERSION = 1  # bump when the architecture or the tokenizer changes: a new cache folder is built


def cache_root() -> Path:
    return Path(os.environ.get("SCALEFORGE_CACHE") or Path.home() / ".cache" / "scaleforge")


def _tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def _write_text_encoder(out: Path) -> None:
    from transformers import Gemma2Config, Gemma2Model

    tok = _tokenizer()
    cfg = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    torch.manual_seed(_SEED)
    Gemma2Model(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def _write_vae(out: Path) -> None:
    from diffusers import AutoencoderDC

    torch.manual_seed(_SEED)
    stages = 6  # 5 downsamplings of 2: f32 latents
    vae = AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=8,
                        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                        encoder_block_out_channels=(8, 8, 8, 8, 16, 32),
                        decoder_block_out_channels=(8, 8, 8, 8, 16, 32),
                        encoder_layers_per_block=(1,) * stages, decoder_layers_per_block=(1,) * stages,
                        encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages,
                        decoder_norm_types="rms_norm", decoder_act_fns="silu")
    vae.save_pretrained(out)


_WRITERS = {TINY_TEXT_ENCODER: _write_text_encoder, TINY_VAE: _write_vae}


def resolve(name: str) -> str:
    """``tiny-gemma2`` / ``tiny-dc-ae``: the folder holding the saved model (built on first use); any other
    name is returned unchanged (a hub id or a local folder)."""
    if name not in _WRITERS:
        return name
    final = cache_root() / f"{name}-v{_VERSION}"
    if not (final / "config.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            _WRITERS[name](tmp)
            try:
                os.replace(tmp, final)  # atomic: a concurrent builder's identical copy may have won
            except OSError:
                if not (final / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
