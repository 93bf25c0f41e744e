"""Interpretability tools for jt_lora models: ``python -m jt_lora.analysis SUBCOMMAND``.

* ``attention``: attention probabilities averaged over heads and examples (padding excluded), per
  layer and per model, as ``.npy`` and heatmaps, plus a layer x model grid (the InA comparison of
  base / LoRA / InA models at several inhibition levels).
* ``head-importance``: head importance as amazon-science/llm-interpret computes it (per-token
  ``|grad . context|`` of each head, default) or as Michel et al. (2019) (``|dL/d head_mask|``,
  normalised per layer); and the loss change when each layer's feed-forward block is knocked out.
* ``induction``: prefix-matching and copying scores per head on random token sequences (Olsson et
  al. 2022, as measured by Bansal et al. 2023 at 66B scale).

Head and FFN masks are inputs of ``GPT2LMModel`` itself, so every score comes from the model's own
forward pass. Names are imported lazily: ``import jt_lora.analysis`` does not load Jittor.
"""
from ..lazy import lazy_exports

_EXPORTS = {
    "ModelSpec": "models", "load_model": "models", "example_batches": "models",
    "AttentionMaps": "attention", "attention_maps": "attention",
    "head_importance": "importance", "ffn_knockout": "importance", "dataset_loss": "importance",
    "random_token_sequences": "induction", "prefix_matching_targets": "induction",
    "prefix_matching_scores": "induction", "copying_scores": "induction", "head_outputs": "induction",
    "embedding_head_values": "induction",
    "induction_scores": "induction", "script_prefix_targets": "induction",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
