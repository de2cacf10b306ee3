"""NVILA ("scale-then-compress") vision-language model recipe (``model.recipe: nvila``).

Parts: ``siglip`` (vision tower), ``dynamic_s2`` (multi-scale tiling and token-count arithmetic),
``projector`` (spatial token compression + projector variants, temporal pooling), ``model``
(``NVILAModel``), ``tokens`` (tokenizer, chat template, labels, packing), ``data`` (synthetic and
webdataset conversations), ``recipe`` (``NVILARecipe``), ``hf_io`` (HF-layout import/export), ``cli``.
"""
