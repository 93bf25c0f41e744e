"""Decoding with microsoft/LoRA's gpt2_beam.py semantics, one concept per module:

* ``beam``: the search (settings, logit post-processing, top-k, candidates, batching);
* ``steppers``: how the search gets next-token logits from the model (cached or recomputed);
* ``cache``: the beam search's KV caches behind the model's cache interface (``models.kv_cache``);
* ``predictions``: the output files (resumable JSONL, resolved config, decoded text).

The command line is ``jt_lora.generate``.
"""
