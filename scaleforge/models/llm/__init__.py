"""Dense Llama / Qwen2-style language model recipe (``model.recipe=llm``).

``from_pretrained(hf_dir)`` loads a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directory
into our ``Transformer`` (``model(input_ids)`` returns logits); ``save_pretrained(model, out_dir)``
writes it back in the HF layout.
"""
from scaleforge.models.llm.hf import export_hf, from_pretrained, save_pretrained
from scaleforge.models.llm.model import PRESETS, LLMModelConfig, Transformer, TransformerBlock, build_transformer

__all__ = [
    "LLMModelConfig", "PRESETS", "Transformer", "TransformerBlock", "build_transformer",
    "export_hf", "from_pretrained", "save_pretrained",
]
