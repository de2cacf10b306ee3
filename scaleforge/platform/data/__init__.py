"""Data loading: the stateful-iterator interface and the webdataset loader (docs/data.md)."""
from scaleforge.platform.data.base import StatefulIterator
from scaleforge.platform.data.batching import (
    AspectRatioBucketBatcher, Batcher, FixedBatcher, PackingBatcher, aspect_ratio_buckets, collate_samples,
    finalize_images, image_to_tensor, packed_attention_mask, resize_center_crop,
)
from scaleforge.platform.data.decode import (
    BadSample, decode_conversation, decode_image, decode_image_boxes, decode_image_text, decode_latent_text,
    decode_sample, decode_tokens, decode_video_text,
)
from scaleforge.platform.data.loader import WebDatasetLoader, build_loader
from scaleforge.platform.data.shards import DataError, expand_patterns

__all__ = [
    "AspectRatioBucketBatcher", "BadSample", "Batcher", "DataError", "FixedBatcher", "PackingBatcher",
    "StatefulIterator", "WebDatasetLoader", "aspect_ratio_buckets", "build_loader", "collate_samples",
    "decode_conversation", "decode_image", "decode_image_boxes", "decode_image_text", "decode_latent_text",
    "decode_sample", "decode_tokens", "decode_video_text", "expand_patterns", "finalize_images",
    "image_to_tensor", "packed_attention_mask", "resize_center_crop",
]
