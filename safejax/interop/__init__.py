"""Hugging Face interop: Llama-architecture checkpoints and tokenizers in and out of safejax."""
