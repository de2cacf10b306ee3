"""SANA / SANA-1.5 Linear DiT recipe (text-to-image flow matching on DC-AE latents). See docs/sana.md."""
from scaleforge.models.sana.model import PRESETS, SanaArch, SanaTransformer, preset_arch


def from_diffusers(path, dtype=None):
    """Our ``SanaTransformer`` from a diffusers ``SanaTransformer2DModel`` folder; its forward takes
    ``(latents, timesteps, text_embeddings, text_mask)`` like diffusers' does."""
    import torch

    from scaleforge.models.sana.diffusers_io import from_diffusers as _load

    return _load(path, dtype or torch.float32)


__all__ = ["PRESETS", "SanaArch", "SanaTransformer", "from_diffusers", "preset_arch"]
