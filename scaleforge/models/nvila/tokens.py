"""Conversations -> token ids and labels (Qwen2 chat template), media-placeholder expansion, packing.

Chat template ``qwen2`` (reference nvila.md §1), implemented in code so that tiny / test configs need
no downloaded tokenizer::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>\\nWhat is this?<|im_end|>\\n
    <|im_start|>assistant\\nA red circle.<|im_end|>\\n

Labels are IGNORE_INDEX everywhere except the assistant replies (content and their ``<|im_end|>``).
Each media placeholder (``<image>``, ``<vila/video>``) is expanded into its visual-token slots
(``n`` copies of the ``<image>`` id, replaced by the visual embeddings in the model) followed by the
``"\\n"`` end token, once per block (Dynamic-S2 image / video: one block; NVILA-Lite: one block per
tile).

Tokenizers: ``model.tokenizer: byte`` builds a real Hugging Face fast tokenizer in-process
(byte-level BPE without merges: 256 byte tokens + the special tokens; ids 0..255 are the bytes), so
the export writes a tokenizer that ``AutoTokenizer`` loads. Any other value is a local HF tokenizer
folder (e.g. Qwen2.5-7B-Instruct's), loaded with ``AutoTokenizer.from_pretrained(local_files_only)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<vila/video>"
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN]
DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def build_byte_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast`` (vocab 256 + 5 special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=EOS)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class ChatTokenizer:
    """The tokenizer plus the ids the recipe needs; picklable (loader workers)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        vocab = hf_tokenizer.get_vocab()
        missing = [t for t in (IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN) if t not in vocab]
        if missing:
            # upstream registers the media placeholders as special tokens; do the same
            hf_tokenizer.add_special_tokens({"additional_special_tokens": missing})
            vocab = hf_tokenizer.get_vocab()
        self.im_start, self.im_end = vocab[IM_START], vocab[IM_END]
        self.image_id, self.video_id = vocab[IMAGE_TOKEN], vocab[VIDEO_TOKEN]
        self.eos_id = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else self.im_end
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id
        self.newline = self.encode("\n")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def load(cls, name: str) -> "ChatTokenizer":
        if name == "byte":
            return cls(build_byte_tokenizer())
        if not os.path.isdir(name):
            raise FileNotFoundError(
                f"model.tokenizer={name!r}: not a local folder. Point it at a Hugging Face tokenizer "
                f"folder (e.g. a downloaded Qwen2.5-7B-Instruct with tokenizer.json), or use 'byte' for "
                f"the built-in byte-level tokenizer of tiny configs")
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(name, local_files_only=True))
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"model.tokenizer={name!r}: cannot load a tokenizer from it: {e}") from None

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def _enc(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.encode(text)
            if len(text) < 64:
                self._cache[text] = ids
        return ids

    # -- chat template ------------------------------------------------------------------------------
    def encode_conversation(self, conversations: Sequence[dict[str, Any]], media_blocks: Sequence[Sequence[int]],
                            system: str | None = DEFAULT_SYSTEM, add_generation_prompt: bool = False,
                            where: str = "sample") -> tuple[list[int], list[int]]:
        """-> (input_ids, labels). ``media_blocks[i]``: visual-token counts of the blocks of the i-th
        media placeholder in reading order (e.g. ``[2560]`` for one Dynamic-S2 image)."""
        ids: list[int] = []
        labels: list[int] = []

        def add(tokens: list[int], learn: bool):
            ids.extend(tokens)
            labels.extend(tokens if learn else [IGNORE_INDEX] * len(tokens))

        turns = [dict(t) for t in conversations]
        if turns and ROLES.get(turns[0].get("from", turns[0].get("role"))) == "system":
            first = turns.pop(0)
            system = first.get("value", first.get("content", ""))
        if system is not None:
            add([self.im_start] + self._enc("system\n" + system) + [self.im_end] + self.newline, False)
        media_iter = iter(media_blocks)
        n_placeholders = 0
        for t in turns:
            role = ROLES.get(t.get("from", t.get("role")))
            if role is None or role == "system":
                raise ValueError(f"{where}: conversation turn has unknown role {t.get('from', t.get('role'))!r}")
            text = t.get("value", t.get("content"))
            if not isinstance(text, str):
                raise ValueError(f"{where}: conversation turn without a text 'value'")
            add([self.im_start] + self._enc(role + "\n"), False)
            if role == "assistant":
                if IMAGE_TOKEN in text or VIDEO_TOKEN in text:
                    raise ValueError(f"{where}: media placeholder inside an assistant reply")
                add(self.encode(text) + [self.im_end], True)
                add(self.newline, False)
                continue
            for piece in _split_media(text):
                if piece in (IMAGE_TOKEN, VIDEO_TOKEN):
                    n_placeholders += 1
                    blocks = next(media_iter, None)
                    if blocks is None:
                        raise ValueError(f"{where}: more media placeholders than media items "
                                         f"({len(media_blocks)})")
                    for n in blocks:
                        add([self.image_id] * n + self.newline, False)
                elif piece:
                    add(self.encode(piece), False)
            add([self.im_end] + self.newline, False)
        if n_placeholders != len(media_blocks):
            raise ValueError(f"{where}: {len(media_blocks)} media items but {n_placeholders} placeholders "
                             f"({IMAGE_TOKEN} / {VIDEO_TOKEN}) in the conversation")
        if add_generation_prompt:
            add([self.im_start] + self._enc("assistant\n"), False)
        return ids, labels


def _split_media(text: str) -> list[str]:
    out, rest = [], text
    while True:
        i, j = rest.find(IMAGE_TOKEN), rest.find(VIDEO_TOKEN)
        cands = [(p, tok) for p, tok in ((i, IMAGE_TOKEN), (j, VIDEO_TOKEN)) if p >= 0]
        if not cands:
            out.append(rest)
            return out
        p, tok = min(cands)
        out += [rest[:p], tok]
        rest = rest[p + len(tok):]
        if rest.startswith("\n"):  # "<image>\n" in the data: the block already ends with "\n"
            rest = rest[1:]


def ensure_placeholders(conversations: list[dict[str, Any]], n_images: int, n_videos: int) -> list[dict]:
    """Samples with media but no placeholders get them prepended to the first user turn (as VILA)."""
    text = "".join(t.get("value", "") for t in conversations)
    if (n_images or n_videos) and IMAGE_TOKEN not in text and VIDEO_TOKEN not in text:
        conversations = [dict(t) for t in conversations]
        for t in conversations:
            if ROLES.get(t.get("from", t.get("role"))) == "user":
                t["value"] = VIDEO_TOKEN * n_videos + IMAGE_TOKEN * n_images + t["value"]
                break
    return conversations


def truncate(ids: list[int], labels: list[int], max_length: int, image_id: int, where: str):
    """Cut to ``max_length``; refuses to cut through visual tokens (that sample is skipped as bad)."""
    if len(ids) <= max_length:
        return ids, labels
    if image_id in ids[max_length:]:
        raise ValueError(f"{where}: {len(ids)} tokens exceed model.max_length={max_length} inside its media "
                         f"tokens; raise model.max_length or use fewer tiles/frames")
    return ids[:max_length], labels[:max_length]


# ---------------------------------------------------------------------------------------------------
# Packing (in-micro-batch, as upstream's repack_multimodal_data)
# ---------------------------------------------------------------------------------------------------
@dataclass
class PackedRow:
    input_ids: torch.Tensor  # [1, L]
    labels: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    cu_seqlens: torch.Tensor  # [n + 1] int32


def pack(samples: Sequence[tuple[list[int], list[int]]], pad_id: int, pad_to_multiple: int = 1) -> PackedRow:
    """Concatenate the samples of a micro-batch into one row: positions restart per sample, the first
    label of every sample is masked (no prediction across samples), ``cu_seqlens`` separates them for
    block-diagonal (CPU) or varlen (GPU) attention. Padding (to a multiple, e.g. 128 for FP8) is one
    extra segment with IGNORE labels."""
    ids, labels, pos, lens = [], [], [], []
    for s_ids, s_labels in samples:
        if len(s_ids) != len(s_labels) or not s_ids:
            raise ValueError("pack: every sample needs equally long, non-empty input_ids and labels")
        ids += s_ids
        labels += [IGNORE_INDEX] + list(s_labels[1:])
        pos += list(range(len(s_ids)))
        lens.append(len(s_ids))
    pad = (-len(ids)) % pad_to_multiple
    if pad:
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += list(range(pad))
        lens.append(pad)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    t = lambda x: torch.tensor(x, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return PackedRow(t(ids), t(labels), t(pos), cu)
