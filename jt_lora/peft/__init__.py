"""HF PEFT's adapter API on jt_lora's GPT-2: LoRA, InA and (IA)³, with PEFT's file format.

``get_peft_model(model, LoraConfig(...))`` wraps a ``GPT2LMModel`` (built with
``adapter='none'``) in a ``PeftModel``; ``save_pretrained`` writes a directory
that ``peft.PeftModel.from_pretrained`` loads onto ``transformers``' GPT-2 with
the same logits, and ``PeftModel.from_pretrained`` reads PEFT's directories
and microsoft/LoRA checkpoints. See ``model.py`` for a tour.
"""
from .config import IA3Config, LoraConfig, PeftConfig
from .interop import AdapterFileError
from .layers import IA3Layer, LoraLayer, ModulesToSaveWrapper
from .model import PeftModel, from_native, get_peft_model
from .tuner import IA3Model, LoraModel

__all__ = ["LoraConfig", "IA3Config", "PeftConfig", "PeftModel", "get_peft_model", "LoraModel", "IA3Model",
           "LoraLayer", "IA3Layer", "ModulesToSaveWrapper", "AdapterFileError", "from_native"]
