"""Writing a model as a HF GPT-2 directory (``save_pretrained``), which transformers and
``GPT2LMModel.from_pretrained`` both load; the adapter file functions are re-exported from
``native_adapter`` (the one adapter format lives in ``adapter_files``).
"""
import json
from pathlib import Path

from ..io.atomic import atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)
from ..nn.adapters import is_adapter_param
from ..nn.adapter_layer import AdapterLayer
from .native_adapter import (ADAPTER_CONFIG, ADAPTER_FIELDS, ADAPTER_WEIGHTS, load_adapter,  # noqa: F401
                             read_adapter_config, save_adapter)
from .tensor_files import save_safetensors  # noqa: F401 (re-exported)

__all__ = ["atomic_write_bytes", "atomic_write_text", "save_safetensors", "save_pretrained",
           "save_adapter", "load_adapter", "read_adapter_config", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FIELDS"]

def _hf_config(cfg) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "initializer_range": cfg.initializer_range,
        "embd_pdrop": cfg.embd_pdrop, "attn_pdrop": cfg.attn_pdrop, "resid_pdrop": cfg.resid_pdrop,
        "bos_token_id": 50256 if cfg.vocab_size > 50256 else None,
        "eos_token_id": 50256 if cfg.vocab_size > 50256 else None, "tie_word_embeddings": True,
    }


def save_pretrained(model, out_dir, include_adapters: bool = False):
    """Base weights as a HF GPT-2 directory. Adapters are left out unless asked (merged or not,
    HF has no place for them); use ``save_adapter`` for those. The mode is kept: a merged layer
    contributes the weights it saved before merging (``AdapterLayer.unmerged_weights``)."""
    out_dir = Path(out_dir)
    unmerged = {}
    for key, m in model.transformer.named_modules():
        if isinstance(m, AdapterLayer) and m._unmerged is not None:
            weight, bias = m.unmerged_weights()
            prefix = key + "." if key else ""
            unmerged[prefix + "weight"] = weight
            if bias is not None:
                unmerged[prefix + "bias"] = bias
    state = {}
    for name, p in model.transformer.named_parameters():
        if is_adapter_param(name) and not include_adapters:
            continue
        state["transformer." + name] = unmerged[name] if name in unmerged else p.numpy()
    save_safetensors(out_dir / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(_hf_config(model.config), indent=2))
