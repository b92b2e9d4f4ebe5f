"""Foreign model formats: Hugging Face `config.json` + safetensors + `tokenizer.json` <-> Craft.

Knows models and tokenizers, not the training loop; training (`model.init_from`), generation,
evaluation and `craft export` use it.
"""
