"""jt_lora: parameter-efficient fine-tuning of GPT-2 in Jittor (LoRA, InA, (IA)³)."""
from . import backend  # noqa: F401  (configures Jittor before anything imports it)
from .adapters import (adapter_state_dict, count_parameters, mark_only_adapter_as_trainable,
                       trainable_parameters)
from .ia3 import IA3Linear
from .lora import Embedding, InhibitionGate, Linear, MergedLinear
from .model import MODEL_CARDS, GPT2Config, GPT2LMModel

__version__ = "0.1.0"
__all__ = ["GPT2Config", "GPT2LMModel", "MODEL_CARDS", "Linear", "Embedding", "MergedLinear",
           "InhibitionGate", "IA3Linear", "mark_only_adapter_as_trainable", "adapter_state_dict",
           "trainable_parameters", "count_parameters"]
