"""PS3 (Scaling Vision Pre-Training to 4K Resolution) recipe (``model.recipe: ps3``).

Parts: ``config`` (model section), ``vision`` (the PS3 encoder: low-res pass with K/V cache, patch
selection, look-close rounds), ``text`` (SigLIP text tower, tokenizers), ``losses`` (SigLIP sigmoid
loss with cross-rank negatives, selection BCE), ``model`` (``PS3Model`` and FLOP counts), ``data``
(image-boxes shards and synthetic samples, multi-scale resize in loader workers), ``recipe``
(``PS3Recipe``), ``hf_io`` (the layout of NVlabs' ``ps3-torch``).
"""
from __future__ import annotations


def from_pretrained(path: str, base=None):
    """Load a ps3-torch folder into our ``PS3Model`` (see ``hf_io.from_pretrained``)."""
    from scaleforge.models.ps3.hf_io import from_pretrained as _load

    return _load(path, base)


def save_pretrained(model, out_dir: str, cfg=None) -> None:
    """Write ``model`` (or a state dict with ``cfg``) as a ps3-torch folder."""
    from scaleforge.models.ps3.hf_io import save_pretrained as _save

    _save(model, out_dir, cfg)
