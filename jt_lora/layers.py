"""loralib-style namespace: ``from jt_lora import layers as lora; lora.MergedLinear(...)``."""
from .nn.adapters import adapter_state_dict as lora_state_dict  # noqa: F401
from .nn.adapters import mark_only_adapter_as_trainable as mark_only_lora_as_trainable  # noqa: F401
from .nn.ia3 import IA3Linear  # noqa: F401
from .nn.lora import Embedding, LoRALayer, Linear, MergedLinear  # noqa: F401
