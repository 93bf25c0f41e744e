"""The one base of every adapter layer: named adapters, activation, and exact merge/unmerge.

Both front-ends build on it. The loralib-style layers (``Linear``, ``MergedLinear``, ``Embedding``,
``IA3Linear``) hold one adapter, ``"default"``, under loralib's flat parameter names
(``c_attn.lora_A``); the PEFT-style layers (``peft.layers.LoraLayer`` / ``IA3Layer``) hold any
number under PEFT's names (``c_attn.lora_A.default.weight``). The names are the only difference:
each layer family answers ``_dense()`` (the module holding ``weight``/``bias``) and its adapter
kind's storage hooks, and everything else (the math, which adapters the forward applies, merging)
lives here and in ``lora.py`` / ``ia3.py`` once.

Merging keeps the dense weight (and bias) as host arrays before the first adapter is folded in, and
unmerging puts those arrays back, so the frozen tensors are bit-identical after any number of
cycles (subtracting an update or dividing by an (IA)³ vector drifts by rounding). The copy lives
only while merged: one copy of each merged layer's weight.
"""
from typing import List, Optional, Sequence

from .modes import AdapterModule, assign_keep_trainable

__all__ = ["AdapterLayer", "DEFAULT_ADAPTER"]

# The adapter name of the loralib-style layers (and PEFT's default name).
DEFAULT_ADAPTER = "default"


class AdapterLayer(AdapterModule):
    """Named adapters on one dense layer; subclasses add an adapter kind's math and storage.

    Subclass hooks: ``adapter_names()`` (what the layer holds), ``merged_state(names)`` (the dense
    tensors with ``names`` folded in, computed without touching the layer), ``_forget(name)`` (drop a
    deleted adapter's settings) and ``_merges_on_eval()`` (loralib's ``merge_weights``).
    """

    _unmerged = None
    disabled = False

    def _init_adapter_layer(self):
        self.active_adapters: List[str] = []
        self.merged_adapters: List[str] = []

    # --- which adapters -----------------------------------------------------------------------
    def adapter_names(self) -> List[str]:
        raise NotImplementedError

    def __contains__(self, name) -> bool:
        return name in self.adapter_names()

    def set_adapter(self, names: Sequence[str]):
        self.active_adapters = [n for n in names if n in self]

    def _pending(self) -> List[str]:
        """Active adapters that forward must still apply (not disabled, not merged)."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def delete_adapter(self, name):
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge before deleting it")
        self._forget(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _forget(self, name):
        """Drop adapter ``name``'s tensors and settings."""
        raise NotImplementedError

    # --- the dense tensors ----------------------------------------------------------------------
    def _dense(self):
        """The module holding ``weight``/``bias``: the layer itself, or a PEFT layer's base."""
        return self

    def _assign_dense(self, weight, bias=None):
        dense = self._dense()
        assign_keep_trainable(dense.weight, weight)
        if bias is not None and getattr(dense, "bias", None) is not None:
            assign_keep_trainable(dense.bias, bias)

    def unmerged_weights(self):
        """(weight, bias) as numpy without adapters folded in, whatever the mode: for writers that
        must not switch the model to train mode."""
        if self._unmerged is not None:
            return self._unmerged
        dense = self._dense()
        return dense.weight.numpy(), None if getattr(dense, "bias", None) is None else dense.bias.numpy()

    # --- merging --------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merged_state(self, names: Sequence[str]):
        """(weight, bias) with ``names`` folded into the current weights; the layer is not touched."""
        raise NotImplementedError

    def apply_merge(self, names: Sequence[str], weight, bias=None):
        """Assign tensors from ``merged_state`` (two phases, so a whole model can be checked first)."""
        if self._unmerged is None:  # the first merge keeps the original
            dense = self._dense()
            self._unmerged = (dense.weight.numpy().copy(),
                              None if getattr(dense, "bias", None) is None else dense.bias.numpy().copy())
        self._assign_dense(weight, bias)
        self.merged_adapters.extend(names)

    def merge(self, names: Optional[Sequence[str]] = None):
        """Fold adapters (default: the active ones) into the dense weight (idempotent; InA raises)."""
        todo = [n for n in (self.active_adapters if names is None else names) if n not in self.merged_adapters]
        if todo:
            self.apply_merge(todo, *self.merged_state(todo))

    def unmerge(self):
        """Restore the tensors saved at the first merge: bit-identical to before merging (idempotent)."""
        if self._unmerged is not None:
            self._assign_dense(*self._unmerged)
            self._unmerged = None
        self.merged_adapters = []

    def _merges_on_eval(self) -> bool:
        """Whether ``eval()`` folds the adapters in (loralib's ``merge_weights``); PEFT layers do not."""
        return False

    def _sync_mode(self):
        """Merge in eval mode and unmerge in train mode, as loralib does."""
        if not self._merges_on_eval():
            return
        if self.training and self.merged:
            self.unmerge()
        elif not self.training and not self.merged:
            self.merge()
