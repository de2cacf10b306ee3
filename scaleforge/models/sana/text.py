"""Conditioning models: the decoder-LLM text encoder (Gemma-2 in SANA) and the DC-AE autoencoder.

Text (sana.md §5): the last hidden states of a decoder LLM loaded through ``transformers`` (``AutoModel``:
for a causal-LM checkpoint this is its decoder without the LM head). With the complex human instruction
(CHI) an instruction block is prepended to each caption, the sequence is tokenised with max length
len(instruction tokens) + L - 2 (right padding), the LLM runs over all of it, and the DiT receives only
BOS + the last L - 1 positions (hidden states and mask), L = 300 in the released models. The default
instruction below follows the structure of SANA's configs; its exact wording is not verified against the
upstream text: pass ``instruction=`` to use another one.

Autoencoder (sana.md §6): DC-AE f32c32 through diffusers' ``AutoencoderDC``; latents are multiplied by
the scaling factor 0.41407 before training and divided by it before decoding.

The names ``tiny-gemma2`` and ``tiny-dc-ae`` load the tiny random models of ``tiny_encoders.py`` (CPU tests,
``configs/sana_tiny.yaml``).
"""
from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_CHI = "\n".join([
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
])


class SanaTextEncoder:
    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = 300, instruction: str | None = DEFAULT_CHI):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.instruction = instruction or None
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            raise ValueError("text encoder tokenizer has no pad token")

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, L, D) fp32, mask (B, L) float) for L = ``max_length``."""
        L = self.max_length
        device = next(self.model.parameters()).device
        if self.instruction:
            texts = [self.instruction + p for p in prompts]
            n_chi = len(self.tokenizer.encode(self.instruction))
            total = n_chi + L - 2
            select = [0] + list(range(total - L + 1, total))  # BOS + the last L - 1 positions
        else:
            texts, total, select = list(prompts), L, list(range(L))
        tok = self.tokenizer(texts, max_length=total, padding="max_length", truncation=True, return_tensors="pt")
        ids, att = tok.input_ids.to(device), tok.attention_mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=att).last_hidden_state
        idx = torch.tensor(select, device=device)
        return hidden[:, idx].float(), att[:, idx].float()


def load_text_encoder(name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      max_length: int = 300, use_chi: bool = True, instruction: str | None = None) -> SanaTextEncoder:
    from transformers import AutoModel, AutoTokenizer

    from scaleforge.models.sana.tiny_encoders import resolve

    try:
        path = resolve(name_or_path)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise FileNotFoundError(f"model.text_encoder={name_or_path!r}: cannot load tokenizer/model ({_first_line(e)})") from None
    if hasattr(model, "get_decoder") and not hasattr(model, "layers"):
        model = model.get_decoder()
    return SanaTextEncoder(model.to(device), tok, max_length, (instruction or DEFAULT_CHI) if use_chi else None)


def load_vae(name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderDC

    from scaleforge.models.sana.tiny_encoders import resolve

    try:
        vae = AutoencoderDC.from_pretrained(resolve(name_or_path), torch_dtype=dtype)
    except OSError as e:
        raise FileNotFoundError(f"model.vae={name_or_path!r}: cannot load AutoencoderDC ({_first_line(e)})") from None
    return vae.to(device).eval()


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def images_to_latents(vae, images: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 32, H/32, W/32)."""
    dtype = next(vae.parameters()).dtype
    return vae.encode(images.to(dtype)).latent.float() * scaling_factor


def latents_to_images(vae, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    dtype = next(vae.parameters()).dtype
    return vae.decode((latents / scaling_factor).to(dtype)).sample.float().clamp(-1, 1)
