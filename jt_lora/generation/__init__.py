"""Decoding: beam search with microsoft/LoRA's gpt2_beam.py semantics and the KV caches it uses."""
