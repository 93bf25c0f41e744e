"""jt_lora: parameter-efficient fine-tuning of GPT-2 in Jittor (LoRA, InA, (IA)³).

Names are imported lazily, so tools that need no Jittor (tokenizer, data preparation, decoding,
metrics) start without paying Jittor's import; the first model-related name configures Jittor
through ``jt_lora.backend``.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GPT2Config": "model", "GPT2LMModel": "model", "MODEL_CARDS": "model",
    "Linear": "lora", "Embedding": "lora", "MergedLinear": "lora", "InhibitionGate": "lora",
    "IA3Linear": "ia3",
    "mark_only_adapter_as_trainable": "adapters", "adapter_state_dict": "adapters",
    "trainable_parameters": "adapters", "count_parameters": "adapters",
    "save_adapter": "saving", "load_adapter": "saving",
    "LoraConfig": "peft", "IA3Config": "peft", "get_peft_model": "peft", "PeftModel": "peft",
    "from_native": "peft",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jt_lora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
