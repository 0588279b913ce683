"""Language models: fetched assets, tokenizers, pretrained weights (Hugging Face, GGUF)."""
