"""jt_lora: parameter-efficient fine-tuning of GPT-2 in Jittor (LoRA, InA, (IA)³).

Names are imported lazily, so tools that need no Jittor (tokenizer, data preparation, decoding,
metrics) start without paying Jittor's import; the first model-related name configures Jittor
through ``jt_lora.backend``.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GPT2Config": "models.gpt2", "GPT2LMModel": "models.gpt2", "MODEL_CARDS": "models.gpt2",
    "Linear": "nn.lora", "Embedding": "nn.lora", "MergedLinear": "nn.lora", "InhibitionGate": "nn.lora",
    "IA3Linear": "nn.ia3",
    "mark_only_adapter_as_trainable": "nn.adapters", "adapter_state_dict": "nn.adapters",
    "trainable_parameters": "nn.adapters", "count_parameters": "nn.adapters",
    "save_adapter": "models.saving", "load_adapter": "models.saving", "load_model": "models.loading",
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
