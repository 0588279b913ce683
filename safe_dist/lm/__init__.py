"""Language models: tokenizers, pretrained weights (Hugging Face, GGUF)."""
