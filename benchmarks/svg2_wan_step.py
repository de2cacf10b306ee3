"""End to end: a Wan-2.1-1.3B-shaped diffusers WanTransformer3DModel (random weights, bf16; 30 layers, 12 heads
x 128, FFN 8960) at 480p x 81 frames (latent 16 x 21 x 60 x 104: 32,760 tokens), denoising steps with dense
attention against SVG2 (apply_svg2: p 0.9, 300 / 1000 clusters; the first SVG2 step runs the 50-iteration
k-means, later steps 2 warm iterations). Prints the time per step and the relative error of each step's output
against the dense model on the same input.

    PYTHONPATH=$PWD python benchmarks/svg2_wan_step.py                  # one H100: ~1.5 min
    PYTHONPATH=$PWD python benchmarks/svg2_wan_step.py --layers 10      # trimmed
    PYTHONPATH=$PWD python benchmarks/svg2_wan_step.py --smoke          # CPU, tiny model, logic only

Random weights give nearly uniform attention (no semantic clusters), so the error here is an upper-end check of
the machinery, not the paper's PSNR on trained weights.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames -> 21)")
    ap.add_argument("--steps", type=int, default=4, help="SVG2 steps timed after its warm-up step")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    from diffusers import WanTransformer3DModel

    from scaleforge.kernels.sparse_attention import SVG2Config, apply_svg2

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    if args.smoke:
        dims = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32)
        latent, clusters = (1, 16, 3, 8, 8), (4, 6)
    else:
        dims = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=args.layers,
                    text_dim=4096, freq_dim=256)  # fmt: skip
        latent, clusters = (1, 16, args.frames, 60, 104), (300, 1000)
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, **dims).to(dev, dt).eval()
    x = torch.randn(latent, device=dev, dtype=dt)
    text = torch.randn(1, 512 if not args.smoke else 7, dims["text_dim"], device=dev, dtype=dt)
    tokens = latent[2] * latent[3] // 2 * latent[4] // 2

    def step(t):
        with torch.no_grad():
            out = model(x, torch.tensor([t], device=dev), text, return_dict=False)[0]
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    def timed(t):
        t0 = time.perf_counter()
        out = step(t)
        return out, (time.perf_counter() - t0) * 1e3

    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; {dims['num_layers']} layers, "
          f"{tokens} tokens, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    step(999)  # compile / autotune warm-up
    timesteps = [999 - 50 * i for i in range(args.steps + 1)]
    dense = [timed(t) for t in timesteps]
    cfg = SVG2Config(q_clusters=clusters[0], k_clusters=clusters[1], top_p=args.top_p, dense_steps=0, dense_layers=0)
    procs = apply_svg2(model, cfg)
    sparse = []
    for t in timesteps:
        y, ms = timed(t)
        sparse.append((y, ms, sum(float(p.state.stats["density"]) for p in procs) / len(procs)))
    print("| step | dense ms | SVG2 ms | speed-up | rel. error vs dense | mean density |")
    print("|---|---|---|---|---|---|")
    for i, ((yd, td), (ys, ts, dens)) in enumerate(zip(dense, sparse)):
        err = float((ys.float() - yd.float()).norm() / yd.float().norm())
        note = " (k-means 50 it)" if i == 0 else ""
        print(f"| {i}{note} | {td:.1f} | {ts:.1f} | {td / ts:.2f}x | {err:.4f} | {dens:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
