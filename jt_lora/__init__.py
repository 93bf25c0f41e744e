"""jt_lora: parameter-efficient fine-tuning of GPT-2 in Jittor (LoRA, InA, (IA)³).

Names are imported lazily, so tools that need no Jittor (tokenizer, data preparation, decoding,
metrics) start without paying Jittor's import; the first model-related name configures Jittor
through ``jt_lora.backend``.
"""
from .lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
