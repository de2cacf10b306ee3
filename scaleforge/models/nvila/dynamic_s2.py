"""Dynamic-S2 multi-scale tiling (NVILA image path) and NVILA-Lite dynamic tiling.

Reference nvila.md §2 (upstream ``llava/mm_utils.py::dynamic_s2_preprocess`` and
``llava/model/llava_arch.py::merge_features_for_dynamic_s2``):

* scales 448, 896, 1344, tile size 448: the 448 and 896 scales squash the image to a square (1 + 4
  tiles); the largest scale keeps the aspect ratio with the (rows, cols) grid, 9 <= rows*cols <= 12,
  closest in aspect ratio (InternVL rule, ties go to the larger grid when the image area exceeds half
  the grid's area) -> **14-17 tiles per image**, all 448x448, stacked on the batch dimension;
* features: each scale's tiles are stitched into one map (32x32, 64x64, 32r x 32c), every map is
  resized with area interpolation in fp32 to the largest map, the maps are concatenated on channels
  (3 x 1152 = 3456) and the result is re-cut into r*c tiles of 32x32 for the projector;
* an image without grid info (one 448 tile: dummy inputs, video frames, multi-image prompts) uses its
  single-scale feature repeated once per scale on the channel axis, as a 1x1 grid.

All geometry is pure integer arithmetic here so token counts are testable without running a ViT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

Grid = tuple[int, int]  # (rows, cols)


# ---------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------
def candidate_grids(min_tiles: int, max_tiles: int) -> list[Grid]:
    """All (rows, cols) with min_tiles <= rows*cols <= max_tiles, smallest area first (stable order)."""
    grids = {(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1)
             if min_tiles <= r * c <= max_tiles}
    return sorted(grids, key=lambda g: (g[0] * g[1], g[1], g[0]))


def closest_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> Grid:
    """The grid whose aspect (cols/rows) is closest to width/height; on a tie a larger grid wins when
    the image area exceeds half of that grid's pixel area (so big images get more tiles)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    best, best_diff = (1, 1), math.inf
    for rows, cols in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (rows, cols), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * rows * cols:
            best = (rows, cols)
    return best


@dataclass(frozen=True)
class S2Settings:
    scales: tuple[int, ...] = (448, 896, 1344)
    tile: int = 448
    max_tiles: int = 12

    def __post_init__(self):
        if not self.scales or any(s % self.tile for s in self.scales):
            raise ValueError(f"model.s2_scales={list(self.scales)} must all be multiples of the tile "
                             f"size {self.tile}")
        if list(self.scales) != sorted(self.scales):
            raise ValueError(f"model.s2_scales={list(self.scales)} must be increasing")
        if (self.scales[-1] // self.tile) ** 2 > self.max_tiles:
            raise ValueError(f"model.max_tiles={self.max_tiles} is below the {(self.scales[-1] // self.tile) ** 2} "
                             f"tiles of the largest scale {self.scales[-1]}")

    @property
    def min_tiles(self) -> int:
        return (self.scales[-1] // self.tile) ** 2


def s2_grids(width: int, height: int, s2: S2Settings) -> list[Grid]:
    """Per-scale tile grids of one image: squares for all but the largest scale, which keeps the
    aspect ratio."""
    grids = [(s // s2.tile, s // s2.tile) for s in s2.scales[:-1]]
    grids.append(closest_grid(width, height, s2.tile, s2.min_tiles, s2.max_tiles))
    return grids


def s2_num_tiles(width: int, height: int, s2: S2Settings = S2Settings()) -> int:
    return sum(r * c for r, c in s2_grids(width, height, s2))


def stc_grid(grid: int, k: int) -> int:
    """Tokens per side after k x k spatial token compression (odd sizes are zero-padded first)."""
    return -(-grid // k)


def tokens_per_tile(tile_grid: int, k: int) -> int:
    return stc_grid(tile_grid, k) ** 2


def s2_visual_tokens(width: int, height: int, s2: S2Settings = S2Settings(), tile_grid: int = 32,
                     k: int = 2) -> int:
    """Visual tokens of one Dynamic-S2 image (without the trailing "\\n" token): the largest-scale grid
    r x c of tiles, each compressed to ceil(32/k)^2 tokens."""
    rows, cols = s2_grids(width, height, s2)[-1]
    return rows * cols * tokens_per_tile(tile_grid, k)


def dynamic_grid(width: int, height: int, tile: int = 448, max_tiles: int = 12) -> Grid:
    """NVILA-Lite dynamic tiling grid (1..max_tiles tiles)."""
    return closest_grid(width, height, tile, 1, max_tiles)


def dynamic_num_tiles(width: int, height: int, tile: int = 448, max_tiles: int = 12) -> int:
    """Tiles of NVILA-Lite dynamic tiling: rows*cols plus one thumbnail when there is more than one."""
    r, c = dynamic_grid(width, height, tile, max_tiles)
    return r * c + (1 if r * c > 1 else 0)


def video_visual_tokens(num_frames: int, tile_grid: int = 32, k: int = 2, temporal_pool: int = 1) -> int:
    if num_frames % temporal_pool:
        raise ValueError(f"video of {num_frames} frames is not divisible by the temporal pool "
                         f"size {temporal_pool} (model.temporal_pool)")
    return num_frames // temporal_pool * tokens_per_tile(tile_grid, k)


# ---------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------
def to_float_image(image) -> torch.Tensor:
    """PIL image / uint8 or float tensor [3, H, W] (or [H, W, 3] numpy) -> float32 [3, H, W] in [0, 1]."""
    if not isinstance(image, torch.Tensor):
        import numpy as np

        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    return image.float()


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Anti-aliased bicubic resize of a [3, H, W] float image, clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    out = F.interpolate(image.unsqueeze(0), size=(height, width), mode="bicubic", antialias=True,
                        align_corners=False)
    return out.squeeze(0).clamp_(0.0, 1.0)


def cut_tiles(image: torch.Tensor, rows: int, cols: int, tile: int) -> torch.Tensor:
    """[3, rows*tile, cols*tile] -> [rows*cols, 3, tile, tile], row-major."""
    c = image.shape[0]
    t = image.view(c, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
    return t.reshape(rows * cols, c, tile, tile)


def normalize(pixels01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=pixels01.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=pixels01.dtype).view(-1, 1, 1)
    return (pixels01 - m) / s


def dynamic_s2_preprocess(image, s2: S2Settings = S2Settings()) -> tuple[torch.Tensor, list[Grid]]:
    """One image -> (tiles [14..17, 3, 448, 448] in [0, 1], per-scale grids)."""
    img = to_float_image(image)
    h, w = img.shape[-2:]
    grids = s2_grids(w, h, s2)
    tiles = [cut_tiles(resize(img, r * s2.tile, c * s2.tile), r, c, s2.tile) for r, c in grids]
    return torch.cat(tiles), grids


def dynamic_preprocess(image, tile: int = 448, max_tiles: int = 12) -> tuple[torch.Tensor, Grid]:
    """NVILA-Lite: r*c aspect-preserving tiles, plus a whole-image thumbnail when r*c > 1."""
    img = to_float_image(image)
    h, w = img.shape[-2:]
    r, c = dynamic_grid(w, h, tile, max_tiles)
    tiles = cut_tiles(resize(img, r * tile, c * tile), r, c, tile)
    if r * c > 1:
        tiles = torch.cat([tiles, resize(img, tile, tile).unsqueeze(0)])
    return tiles, (r, c)


def single_tile(image, tile: int = 448) -> torch.Tensor:
    """One squashed tile [1, 3, tile, tile] (video frames, multi-image prompts, VILA-1.5 mode)."""
    return resize(to_float_image(image), tile, tile).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------
def stitch(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows*cols, h, w, C] tiles (row-major) -> one [rows*h, cols*w, C] map."""
    n, h, w, c = tiles.shape
    if n != rows * cols:
        raise ValueError(f"cannot stitch {n} tiles into a {rows}x{cols} grid")
    return tiles.view(rows, cols, h, w, c).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def unstitch(fmap: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``stitch``: [rows*h, cols*w, C] -> [rows*cols, h, w, C]."""
    hh, ww, c = fmap.shape
    h, w = hh // rows, ww // cols
    return fmap.view(rows, h, cols, w, c).permute(0, 2, 1, 3, 4).reshape(rows * cols, h, w, c)


def merge_s2_features(features: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
    """ViT features of one image [N_tiles, g*g, C] -> projector input [r*c, g, g, len(grids)*C].

    Per scale: stitch tiles into a map, resize the map to the largest map with area interpolation
    (in fp32, as upstream), concatenate scales on channels, re-cut into the largest scale's tiles.
    """
    n, tokens, c = features.shape
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise ValueError(f"vision features have {tokens} tokens per tile, not a square grid")
    if n != sum(r * cc for r, cc in grids):
        raise ValueError(f"{n} tiles do not match the per-scale grids {list(grids)}")
    rows, cols = grids[-1]
    maps, start = [], 0
    for r, cc in grids:
        tiles = features[start:start + r * cc].reshape(r * cc, g, g, c)
        start += r * cc
        fmap = stitch(tiles, r, cc).permute(2, 0, 1).unsqueeze(0).float()  # [1, C, H, W]
        if (r, cc) != (rows, cols):
            fmap = F.interpolate(fmap, size=(rows * g, cols * g), mode="area")
        maps.append(fmap.to(features.dtype))
    merged = torch.cat(maps, dim=1).squeeze(0).permute(1, 2, 0)  # [rows*g, cols*g, S*C]
    return unstitch(merged, rows, cols)


def single_scale_features(features: torch.Tensor, num_scales: int) -> torch.Tensor:
    """[N, g*g, C] single-tile features -> [N, g, g, num_scales*C] (repeated on channels, 1x1 grids)."""
    n, tokens, c = features.shape
    g = math.isqrt(tokens)
    return features.reshape(n, g, g, c).repeat(1, 1, 1, num_scales)
