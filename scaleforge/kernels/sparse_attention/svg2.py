"""SVG2 (Sparse VideoGen 2, kernels.md §2.4): semantic-aware permutation by k-means on Q and K per head and a
top-p budget over key clusters, then variable-block-sparse attention."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SVG2Config:
    """Knobs of SVG2 (defaults: the paper's Wan 2.1 settings).

    q_clusters / k_clusters: k-means clusters per head on Q / K; init_iters: Lloyd iterations the first time a
    layer runs; warm_iters: iterations per later step, warm-started from that layer's cached centroids;
    top_p: estimated attention mass each query cluster keeps; min_key_fraction: fraction of key clusters each
    query cluster always keeps (the top ones); dense_steps / dense_layers: the first calls of every layer and
    the first layers run dense attention (SVG2's warm-up)."""

    q_clusters: int = 300
    k_clusters: int = 1000
    init_iters: int = 50
    warm_iters: int = 2
    top_p: float = 0.9
    min_key_fraction: float = 0.1
    dense_steps: int = 5
    dense_layers: int = 1

    def __post_init__(self):
        for name in ("q_clusters", "k_clusters"):
            if getattr(self, name) < 1:
                raise ValueError(f"SVG2Config.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SVG2Config.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_key_fraction <= 1.0:
            raise ValueError(f"SVG2Config.min_key_fraction must be in [0, 1], got {self.min_key_fraction}")
        for name in ("init_iters", "warm_iters", "dense_steps", "dense_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"SVG2Config.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class SVG2State:
    """One layer's cached centroids (warm start of the next step's k-means) and the last step's statistics:
    density = the fraction of (query, key) token pairs the block map kept."""

    q_centroids: torch.Tensor | None = None
    k_centroids: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


def svg2_attention(q, k, v, cfg: SVG2Config, state: SVG2State | None = None, *, backend: str | None = None):
    """SVG2 attention of q, k, v (B, H, S, D) (non-causal). ``state`` carries the centroids between calls
    (warm start) and receives the step's density. -> (B, H, S, D) in q's dtype."""
    from scaleforge.kernels.sparse_attention import (
        block_sparse_attention, cluster_permutation, kmeans, topp_budget,
    )  # fmt: skip

    state = SVG2State() if state is None else state
    warm = state.q_centroids is not None and state.q_centroids.shape[:2] == q.shape[:2]
    iters = cfg.warm_iters if warm else cfg.init_iters
    q_labels, q_cent = kmeans(q, cfg.q_clusters, init=state.q_centroids if warm else None, iters=iters,
                              backend=backend)  # fmt: skip
    k_labels, k_cent = kmeans(k, cfg.k_clusters, init=state.k_centroids if warm else None, iters=iters,
                              backend=backend)  # fmt: skip
    state.q_centroids, state.k_centroids = q_cent, k_cent
    q_perm, q_sizes = cluster_permutation(q_labels, q_cent.shape[2])
    k_perm, k_sizes = cluster_permutation(k_labels, k_cent.shape[2])
    block_map = topp_budget(q_cent, k_cent, k_sizes, cfg.top_p, cfg.min_key_fraction, backend=backend)
    pairs = (q_sizes.float()[..., :, None] * k_sizes.float()[..., None, :] * block_map).sum()
    state.stats["density"] = pairs / (q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])  # a tensor: no sync
    # the permutation is applied inside the kernel's loads and stores (q, k, v never move in memory)
    return block_sparse_attention(q, k, v, q_sizes, k_sizes, block_map, q_perm=q_perm, k_perm=k_perm,
                                  backend=backend)  # fmt: skip
