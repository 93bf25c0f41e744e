"""``PeftModel``: HF PEFT's wrapper API on a jt_lora GPT-2.

    from jt_lora import GPT2LMModel, LoraConfig, get_peft_model
    model = get_peft_model(GPT2LMModel.from_pretrained("gpt2"), LoraConfig(r=4, lora_alpha=32))  # plain base
    model.print_trainable_parameters()
    logits, _ = model(input_ids)              # forward (and generation) pass through
    model.save_pretrained("out/adapter")      # adapter_config.json + adapter_model.safetensors

The wrapper holds the tuner as ``base_model`` and the GPT-2 as
``base_model.model``, as PEFT does, so parameter names and saved keys agree
with PEFT's. Attributes it lacks (``config``, ``transformer``, ``logits``)
come from the wrapped model, so code written for ``GPT2LMModel`` (the beam
search, the trainer) takes a ``PeftModel`` unchanged.
"""
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..nn.modes import AdapterModule
from .config import PeftConfig
from .interop import assign_state, check_reference_compatible, load_adapter_into, read_adapter, save_adapter_dir
from .tuner import TUNERS

__all__ = ["PeftModel", "get_peft_model", "from_native"]


class PeftModel(AdapterModule):
    """A model with named adapters (LoRA, InA or (IA)³; one kind per model).

    Args:
        model: a jt_lora model without native adapters (``GPT2LMModel`` with ``adapter='none'``);
            it is modified in place: targeted layers are wrapped, the base is frozen.
        peft_config: a ``LoraConfig`` or ``IA3Config``.
        adapter_name: name of the first adapter, active and trainable.
    """

    def __init__(self, model, peft_config: PeftConfig, adapter_name: str = "default"):
        if peft_config.peft_type not in TUNERS:
            raise TypeError(f"peft_config must be a LoraConfig or IA3Config, got {type(peft_config).__name__}")
        self.base_model = TUNERS[peft_config.peft_type](model, peft_config, adapter_name)

    def __getattr__(self, name):
        if name.startswith("_") or name == "base_model":
            raise AttributeError(name)
        try:
            base = self.__dict__["base_model"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(base, name)

    def execute(self, *args, **kw):
        return self.base_model.model(*args, **kw)

    # --- state ---------------------------------------------------------------------------------
    @property
    def peft_config(self):
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> List[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> Optional[str]:
        return self.base_model.active_adapters[0] if self.base_model.active_adapters else None

    def get_base_model(self):
        """The wrapped model (with tuner layers in place)."""
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """(trainable, all) parameter counts, adapters and base included, as PEFT counts them."""
        from ..nn.adapters import count_parameters
        return count_parameters(self)

    def print_trainable_parameters(self):
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # --- adapters ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig):
        """Add an adapter, frozen and inactive until ``set_adapter`` (as PEFT)."""
        self.base_model.inject_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False):
        """Activate one adapter or several (their outputs add up; (IA)³ vectors multiply)."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str):
        self.base_model.delete_adapter(adapter_name)

    def enable_adapter_layers(self):
        self.base_model.enable_adapter_layers()

    def disable_adapter_layers(self):
        self.base_model.disable_adapter_layers()

    @contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter():`` runs the base model."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, **kw):
        """See ``LoraModel.add_weighted_adapter`` / ``IA3Model.add_weighted_adapter``."""
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, **kw)

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False):
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self):
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None):
        """The plain model with adapters (default: active) merged in; raises before changing anything
        if ``safe_merge`` finds NaN/inf or an adapter is InA."""
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self):
        """The base model back: adapters removed, weights bit-identical, trainability as before."""
        return self.base_model.unload()

    # --- files ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, selected_adapters: Optional[Sequence[str]] = None,
                        reference_compatible: bool = False):
        """Write each adapter as HF PEFT does: ``default`` in ``save_directory``, others in
        ``save_directory/<name>``; each file atomically.

        ``reference_compatible=True`` is the export for stock PEFT / the InA reference code: it
        refuses, before writing anything, adapters they would read as a different model (a
        q/v-grouped InA adapter; InA with a slope other than 0.01).
        """
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self.base_model._check_names(names)
        if reference_compatible:
            for name in names:
                check_reference_compatible(self.base_model, name)
        for name in names:
            out = Path(save_directory) if name == "default" else Path(save_directory) / name
            save_adapter_dir(self.base_model, name, out, reference_compatible)

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False,
                     config: Optional[PeftConfig] = None):
        """Add an adapter from a PEFT directory or a microsoft/LoRA checkpoint, inactive (as PEFT).
        A bad file raises and leaves the model as it was."""
        load_adapter_into(self.base_model, model_id, adapter_name, is_trainable=is_trainable, config=config)
        if not is_trainable:
            self.eval()  # as PEFT: dropout off for inference

    @classmethod
    def from_pretrained(cls, model, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        config: Optional[PeftConfig] = None) -> "PeftModel":
        """Wrap ``model`` with the adapter in ``model_id``: a directory written by HF PEFT or jt_lora, or
        a microsoft/LoRA checkpoint file (``config`` then gives lora_alpha; default 32).

        Everything is read and checked against the model before the model changes; if the tensors
        do not fit, the model is given back as it was and the error names the key and shapes.
        """
        config, state, peft_layout = read_adapter(model_id, model, config)
        config = config.replace(inference_mode=not is_trainable)
        peft_model = cls(model, config, adapter_name)
        try:
            assign_state(peft_model.base_model, adapter_name, state, str(model_id), peft_layout)
        except BaseException:
            peft_model.base_model.unload()
            raise
        if not is_trainable:
            peft_model.eval()  # as PEFT: dropout off for inference
        return peft_model


def get_peft_model(model, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with a new trainable adapter (PEFT's ``get_peft_model``)."""
    return PeftModel(model, peft_config, adapter_name)


def from_native(model, adapter_name: str = "default"):
    """Turn a GPT2LMModel built with its own adapter (``adapter='lora'|'ina'|'ia3'``, e.g. trained by
    ``jt_lora.train``) into an equivalent ``PeftModel``, in place: the native layers become plain
    base layers holding the same (unmerged) weights, and the adapter tensors move into a PEFT-style
    adapter with the same config ``save_adapter`` writes. The train/eval mode is kept.
    """
    from ..models.native_adapter import native_adapter_config
    from ..nn.lora import Linear
    from .layers import assign
    from .tuner import _set_child

    training = model.training
    config, layers = native_adapter_config(model)
    tensors = {}
    for key, m in layers:
        if m.merged:
            m.unmerge()  # this layer is discarded; the model's mode is not touched
        base = Linear(m.in_features, m.out_features, fan_in_fan_out=m.fan_in_fan_out, bias=m.bias is not None)
        base.weight, base.bias = m.weight, m.bias
        tensors[key] = (m.ia3_l.numpy(),) if hasattr(m, "ia3_l") else (m.lora_A.numpy(), m.lora_B.numpy())
        _set_child(model, key, base)
    model.config = model.transformer.config = model.config.replace(adapter="none")
    targets = {"target_modules": tuple(tensors)}
    if config.peft_type == "IA3":
        targets["feedforward_modules"] = tuple(k for k, m in layers if m.feedforward)
    peft_model = PeftModel(model, config.replace(**targets), adapter_name)
    tuner = peft_model.base_model
    for key, layer in tuner.tuner_layers():
        values = tensors[key]
        if len(values) == 1:
            assign(layer.ia3_l[adapter_name], values[0].reshape(layer.ia3_l[adapter_name].shape))
        else:
            assign(layer.lora_A[adapter_name].weight, values[0])
            assign(layer.lora_B[adapter_name].weight, values[1])
    peft_model._set_mode(training)
    return peft_model
