"""SANA conditioning (tiny random Gemma-2 + DC-AE through transformers / diffusers) and the
`scaleforge sana` handlers run in-process: precompute, grow, prune, sample."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleforge.models.sana.cli import add_sana_subcommands
from scaleforge.models.sana.diffusers_io import export_diffusers, load_diffusers
from scaleforge.models.sana.model import SanaTransformer, preset_arch

WORDS = ("a red blue green yellow circle square triangle and on white background small big of the "
         "given user prompt generate enhanced detailed visual please only for below").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from diffusers import AutoencoderDC
    from transformers import Gemma2Config, Gemma2Model

    root = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    Gemma2Model(cfg).save_pretrained(root / "te")
    tok.save_pretrained(root / "te")
    vae = AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=8,
                        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                        encoder_block_out_channels=(8, 8, 8, 8, 16, 32), decoder_block_out_channels=(8, 8, 8, 8, 16, 32),
                        encoder_layers_per_block=(1, 1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
                        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
                        decoder_norm_types="rms_norm", decoder_act_fns="silu")
    vae.save_pretrained(root / "vae")
    return str(root / "te"), str(root / "vae")


def _parse(argv):
    ap = argparse.ArgumentParser()
    add_sana_subcommands(ap.add_subparsers(dest="cmd"))
    return ap.parse_args(argv)


def test_text_encoder_chi_selection(encoders):
    from scaleforge.models.sana.text import load_text_encoder

    te_path, _ = encoders
    te = load_text_encoder(te_path, max_length=8, use_chi=True)
    emb, mask = te.encode(["a red circle", "a big blue square on a white background"])
    assert emb.shape == (2, 8, 32) and mask.shape == (2, 8)
    # BOS kept first; the rest are the LAST 7 positions of instruction + caption (+ padding)
    ids = te.tokenizer([te.instruction + "a red circle"], max_length=len(te.tokenizer.encode(te.instruction)) + 6,
                       padding="max_length", truncation=True).input_ids[0]
    hidden = te.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert torch.allclose(emb[0, 0], hidden[0], atol=1e-5)
    assert int(mask[0].sum()) < int(mask[1].sum())  # the shorter caption ends in padding
    # the instruction conditions the features: without CHI the same caption encodes differently
    te2 = load_text_encoder(te_path, max_length=8, use_chi=False)
    emb2, _ = te2.encode(["a red circle"])
    assert not torch.allclose(emb2[0, 1], emb[0, 1])


def test_grow_and_prune_commands(tmp_path):
    torch.manual_seed(0)
    arch = preset_arch("tiny", depth=4)
    src = SanaTransformer(arch)
    src.init_weights()
    export_diffusers(src.state_dict(), tmp_path / "src", arch)
    args = _parse(["sana", "grow", "--ckpt", str(tmp_path / "src"), "--depth", "7", "--source-layers", "3",
                   "--out", str(tmp_path / "grown")])
    assert args.func(args) == 0
    garch, gsd = load_diffusers(tmp_path / "grown")
    assert garch.depth == 7 and torch.equal(gsd["blocks.2.attn.qkv.weight"], src.state_dict()["blocks.2.attn.qkv.weight"])
    assert gsd["blocks.5.attn.proj.weight"].abs().sum() == 0

    args = _parse(["sana", "prune", "--ckpt", str(tmp_path / "grown"), "--keep", "4", "--calib-samples", "8",
                   "--sigmas", "0.3", "0.7", "--out", str(tmp_path / "pruned")])
    assert args.func(args) == 0
    rep = json.loads((tmp_path / "pruned" / "importance.json").read_text())
    imp = rep["importance"]
    # the 4 identity blocks added by growth change nothing: importance 0, and they are the ones dropped
    assert all(abs(v) < 1e-6 for v in imp[3:]) and all(v > 1e-4 for v in imp[:3])
    assert rep["kept"][:3] == [0, 1, 2] and len(rep["kept"]) == 4
    parch, psd = load_diffusers(tmp_path / "pruned" / "model")
    assert parch.depth == 4
    assert (tmp_path / "pruned" / "importance.png").stat().st_size > 1000
    assert "| block | importance |" in (tmp_path / "pruned" / "report.md").read_text()


def test_precompute_then_sample(tmp_path, encoders):
    from PIL import Image
    import webdataset as wds

    te_path, vae_path = encoders
    shard = tmp_path / "in-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i, (cap, hw) in enumerate([("a red circle", (64, 64)), ("a blue square", (64, 128))]):
            img = Image.fromarray((np.random.RandomState(i).rand(*hw, 3) * 255).astype("uint8"))
            import io
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            w.write({"__key__": f"{i:08d}", "png": buf.getvalue(), "txt": cap.encode()})
    args = _parse(["sana", "precompute", "--shards", str(shard), "--out", str(tmp_path / "pre"),
                   "--text-encoder", te_path, "--vae", vae_path, "--image-size", "64", "--text-len", "8",
                   "--device", "cpu"])
    assert args.func(args) == 0
    from scaleforge.models.sana.recipe import _latent_text_sample

    samples = [_latent_text_sample(raw) for raw in wds.WebDataset(str(tmp_path / "pre" / "shard-000000.tar"),
                                                                  shardshuffle=False)]
    assert len(samples) == 2
    assert samples[0]["latents"].shape[0] == 32 and samples[0]["text_embeddings"].shape == (8, 32)
    # the wide image went to a wide bucket
    assert samples[1]["latents"].shape[2] > samples[1]["latents"].shape[1]

    torch.manual_seed(0)
    arch = preset_arch("tiny", text_len=8)
    m = SanaTransformer(arch)
    m.init_weights()
    export_diffusers(m.state_dict(), tmp_path / "model", arch)
    args = _parse(["sana", "sample", "--ckpt", str(tmp_path / "model"), "--prompt", "a red circle", "a blue square",
                   "--steps", "3", "--height", "64", "--width", "96", "--text-encoder", te_path, "--vae", vae_path,
                   "--out", str(tmp_path / "samples"), "--device", "cpu"])
    assert args.func(args) == 0
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size == (96, 64)
