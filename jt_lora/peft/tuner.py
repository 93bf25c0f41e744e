"""Finding target modules and managing named adapters on a jt_lora model (PEFT's tuners).

``LoraModel`` / ``IA3Model`` hold the model as ``.model`` (so parameter names
read ``base_model.model.transformer...`` under ``PeftModel``, as in PEFT) and
swap tuner layers in for the targeted modules. Matching follows PEFT's
``check_target_module_exists``: a string is a regex full match on the module
name, a list matches exact names or ``.``-suffixes, ``exclude_modules`` wins
over targets, and ``'all-linear'`` takes every dense layer (jt_lora's GPT-2
has no separate output head: logits reuse ``wte``).

Every operation that could fail checks first and changes the model only
after the checks pass; ``merge_adapter`` computes the merged weights of the
whole model before assigning any.
"""
import math
import re
import warnings
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..backend import jt
from ..nn.modes import AdapterModule
from .config import ALL_LINEAR, DEFAULT_TARGETS, IA3Config, LoraConfig, PeftConfig
from .layers import IA3Layer, LoraLayer, ModulesToSaveWrapper, TunerLayer, assign, linear_info

__all__ = ["BaseTuner", "LoraModel", "IA3Model", "check_target_module_exists", "model_type", "TUNERS"]


def model_type(model) -> Optional[str]:
    """``'gpt2'`` for jt_lora's GPT-2 (the only architecture with default targets), else None."""
    from ..models.gpt2 import GPT2LMModel
    return "gpt2" if isinstance(model, GPT2LMModel) else None


def _matches(patterns, key: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return key in patterns or any(key.endswith(f".{p}") for p in patterns)


def check_target_module_exists(config: PeftConfig, key: str) -> bool:
    """PEFT's rule: excluded and modules_to_save names never match; then regex or name/suffix."""
    if config.exclude_modules and _matches(config.exclude_modules, key):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    return _matches(config.target_modules, key)


def _set_child(model, key: str, new):
    parent_key, _, child = key.rpartition(".")
    parent = model
    for part in filter(None, parent_key.split(".")):
        parent = parent[part] if isinstance(parent, jt.nn.Sequential) else getattr(parent, part)
    if isinstance(parent, jt.nn.Sequential):
        parent.layers[child] = new
    else:
        setattr(parent, child, new)


def _valid_name(name):
    if not isinstance(name, str) or not name or name.startswith("_") or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.' that does not start with '_', "
                         f"got {name!r}")


class BaseTuner(AdapterModule):
    """Adapter bookkeeping shared by LoRA and (IA)³: inject, activate, delete, merge, unload."""

    prefix = ""
    config_cls = PeftConfig
    layer_cls = TunerLayer

    def __init__(self, model, config: PeftConfig, adapter_name: str = "default"):
        if any(isinstance(m, (TunerLayer, ModulesToSaveWrapper)) for m in model.modules()):
            raise ValueError("the model already holds tuner layers; use PeftModel.add_adapter to add another adapter")
        adapter = getattr(getattr(model, "config", None), "adapter", "none")
        if adapter != "none":
            raise ValueError(f"the model was built with its own adapter (config.adapter={adapter!r}); build the base "
                             f"without one (GPT2LMModel.from_pretrained(path) gives the plain model), or convert "
                             f"a natively trained adapter with jt_lora.peft.from_native(model)")
        self.model = model
        self.peft_config: Dict[str, PeftConfig] = {}
        self.active_adapters: List[str] = [adapter_name]
        self._base_grad = {id(p): not p.is_stop_grad() for p in model.parameters()}
        self.inject_adapter(adapter_name, config)
        self.set_adapter([adapter_name], inference_mode=config.inference_mode)

    def __getattr__(self, name):
        """Attributes the tuner lacks come from the model (``config``, ``transformer``, ``logits`` ...)."""
        if name.startswith("_") or name == "model":
            raise AttributeError(name)
        try:
            model = self.__dict__["model"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(model, name)

    def execute(self, *args, **kw):
        return self.model(*args, **kw)

    # --- finding modules -------------------------------------------------------------------
    def tuner_layers(self):
        """(name, layer) of every tuner layer and modules-to-save wrapper, in model order."""
        return [(k, m) for k, m in self.model.named_modules() if isinstance(m, (TunerLayer, ModulesToSaveWrapper))]

    def _candidates(self):
        """(name, module) of modules that may be targeted: not inside a tuner layer or wrapper."""
        inside, out = [], []
        for key, module in self.model.named_modules():
            if not key or any(key.startswith(p + ".") for p in inside):
                continue
            if isinstance(module, (TunerLayer, ModulesToSaveWrapper)):
                inside.append(key)
            out.append((key, module))
        return out

    def _prepare_config(self, config: PeftConfig) -> PeftConfig:
        """A copy with the architecture's default targets filled in (the user's object stays as given)."""
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        config = config.replace()
        if config.target_modules is None:
            arch = model_type(self.model)
            if arch is None:
                raise ValueError(f"target_modules must be given for {type(self.model).__name__}: only GPT-2 has "
                                 f"default target modules")
            defaults = DEFAULT_TARGETS[config.peft_type][arch]
            changes = {k: v for k, v in defaults.items() if getattr(config, k) is None}
            config = config.replace(**changes)
        return config

    def _match(self, config: PeftConfig):
        """(targets [(key, module)], config with 'all-linear' resolved)."""
        candidates = self._candidates()
        linear = [(k, m) for k, m in candidates
                  if linear_info(m) is not None or isinstance(m, TunerLayer)]
        if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
            config = config.replace(target_modules=tuple(k for k, _ in linear))
        targets = [(k, m) for k, m in candidates if check_target_module_exists(config, k)]
        if not targets:
            names = sorted({".".join(k.split(".")[-2:]) for k, _ in linear})
            raise ValueError(f"target_modules={config.target_modules!r} matched no module of "
                             f"{type(self.model).__name__}; dense layers that can be targeted: {names} "
                             f"(full names like {linear[0][0] if linear else 'none'!r})")
        bad = [k for k, m in targets if linear_info(m) is None and not isinstance(m, self.layer_cls)]
        if bad:
            raise ValueError(f"target modules {bad[:4]} are not dense layers (types: "
                             f"{sorted({type(m).__name__ for k, m in targets if k in bad})}); only Linear layers can "
                             f"carry a {config.peft_type} adapter")
        return targets, config

    # --- adding adapters -------------------------------------------------------------------
    def inject_adapter(self, adapter_name: str, config: PeftConfig):
        """Wrap (or extend) every targeted module with adapter ``adapter_name``; frozen until activated."""
        _valid_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if self.peft_config:
            kind = next(iter(self.peft_config.values())).peft_type
            if config.peft_type != kind:
                raise ValueError(f"cannot add a {config.peft_type} adapter to a model holding {kind} adapters")
        config = self._prepare_config(config)
        targets, config = self._match(config)
        self._check_targets(config, targets)
        to_save = self._modules_to_save(config)
        for key, module in targets:
            base = module.base_layer if isinstance(module, TunerLayer) else module
            config.fan_in_fan_out = linear_info(base)[2]  # jt_lora layers know their layout; the file records it
            if isinstance(module, self.layer_cls):
                layer = module
            else:
                layer = self._new_layer(config, key, module)
                _set_child(self.model, key, layer)
            self._update_layer(layer, adapter_name, config, key)
            for p in layer.adapter_params(adapter_name):
                p.stop_grad()
        for key, module in to_save:
            if not isinstance(module, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(module)
                _set_child(self.model, key, wrapper)
                module = wrapper
            module.update(adapter_name)
            for p in module.adapter_params(adapter_name):
                p.stop_grad()
        self.peft_config[adapter_name] = config

    def _modules_to_save(self, config):
        """(key, module) for every name in ``modules_to_save``, all found before anything changes."""
        found = []
        for name in config.modules_to_save or ():
            hits = [(k, m) for k, m in self._candidates() if k == name or k.endswith("." + name)]
            if not hits:
                raise ValueError(f"modules_to_save: no module named {name!r}")
            found.extend(hits)
        return found

    def _check_targets(self, config, targets):
        """Method-specific checks before anything is changed."""

    def _new_layer(self, config, key, module) -> TunerLayer:
        raise NotImplementedError

    def _update_layer(self, layer, adapter_name, config, key):
        raise NotImplementedError

    # --- activation and trainability ------------------------------------------------------
    def _check_names(self, names: Sequence[str]):
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter(s) {unknown} not found; available: {sorted(self.peft_config)}")

    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False):
        """Make ``adapter_names`` the active adapters: forward uses them, and they train (unless
        ``inference_mode``) while every other adapter and the base model are frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for _, layer in self.tuner_layers():
            if isinstance(layer, TunerLayer) and layer.merged and set(layer.merged_adapters) - set(names):
                warnings.warn("adapter layers are merged; unmerging them before changing the active adapters")
                layer.unmerge()
            layer.set_adapter(names)
        self.active_adapters = names
        self._mark_trainable(inference_mode)

    def _mark_trainable(self, inference_mode: bool = False):
        adapter_ids, trainable = set(), []
        for _, layer in self.tuner_layers():
            for name in layer.adapter_names():
                params = layer.adapter_params(name)
                adapter_ids.update(id(p) for p in params)
                if name in self.active_adapters and not inference_mode:
                    trainable.extend(params)
        for p in self.model.parameters():
            p.stop_grad()
        for p in trainable:
            p.start_grad()
        if not inference_mode:
            self._mark_bias_trainable(adapter_ids)

    def _mark_bias_trainable(self, adapter_ids):
        """Biases per the active adapters' ``bias`` setting (LoRA only)."""

    # --- deleting, disabling ---------------------------------------------------------------
    def delete_adapter(self, adapter_name: str):
        """Remove an adapter everywhere; layers left without adapters give their base layer back."""
        self._check_names([adapter_name])
        merged = [k for k, layer in self.tuner_layers()
                  if isinstance(layer, TunerLayer) and adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}; unmerge_adapter() first")
        for key, layer in self.tuner_layers():
            if adapter_name in layer:
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names():
                    base = layer.base_layer if isinstance(layer, TunerLayer) else layer.original_module
                    _set_child(self.model, key, base)
        del self.peft_config[adapter_name]
        if adapter_name in self.active_adapters:
            active = [n for n in self.active_adapters if n != adapter_name]
            if not active and self.peft_config:
                active = [next(iter(self.peft_config))]
                warnings.warn(f"deleted the active adapter {adapter_name!r}; {active[0]!r} is now active")
            self.set_adapter(active)

    def _enable_adapter_layers(self, enabled: bool):
        for _, layer in self.tuner_layers():
            if not enabled and isinstance(layer, TunerLayer):
                layer.unmerge()
            layer.disabled = not enabled

    def enable_adapter_layers(self):
        self._enable_adapter_layers(True)

    def disable_adapter_layers(self):
        """Forward computes the base model (merged layers are unmerged first)."""
        self._enable_adapter_layers(False)

    # --- merging, unloading ------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False):
        """Fold adapters (default: the active ones) into the base weights.

        All merged weights are computed before any is assigned; with ``safe_merge`` a NaN or inf
        anywhere raises and leaves the model unchanged.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        self._check_names(names)
        staged = []
        for key, layer in self.tuner_layers():
            if not isinstance(layer, TunerLayer):
                continue
            todo = [n for n in names if n in layer and n not in layer.merged_adapters]
            if todo:
                weight, bias = layer.merged_state(todo)
                staged.append((key, layer, todo, weight, bias))
        if safe_merge:
            for key, _, todo, weight, bias in staged:
                for what, value in (("weight", weight), ("bias", bias)):
                    if value is not None and not np.isfinite(value.numpy()).all():
                        raise ValueError(f"safe_merge: merging adapter(s) {todo} into {key} gives NaN/inf in the "
                                         f"{what}; the adapter is broken. Nothing was merged.")
        for _, layer, todo, weight, bias in staged:
            layer.apply_merge(todo, weight, bias)

    def unmerge_adapter(self):
        """Restore every merged layer's base weights exactly."""
        for _, layer in self.tuner_layers():
            if isinstance(layer, TunerLayer):
                layer.unmerge()

    def _unwrap(self, keep_merged: bool):
        for key, layer in self.tuner_layers():
            if isinstance(layer, TunerLayer):
                if not keep_merged:
                    layer.unmerge()
                _set_child(self.model, key, layer.base_layer)
            else:
                _set_child(self.model, key, layer.active_module() if keep_merged else layer.original_module)
        self.peft_config.clear()
        self.active_adapters = []

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None):
        """Merge adapters (default: active) and return the plain model with them built in.

        Modules to save are replaced by the active adapter's copy. InA adapters cannot merge.
        """
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        self._unwrap(keep_merged=True)
        return self.model

    def unload(self):
        """Return the base model, unmerged, with its tensors bit-identical and its original trainability."""
        self._unwrap(keep_merged=False)
        for p in self.model.parameters():
            if id(p) in self._base_grad:
                p.start_grad() if self._base_grad[id(p)] else p.stop_grad()
        return self.model

    # --- combining -------------------------------------------------------------------------
    def _combined_targets(self, adapters, field="target_modules"):
        values = [getattr(self.peft_config[a], field) for a in adapters]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1:
            raise ValueError(f"cannot combine adapters whose {field} mix regex strings and name lists: {values}")
        if str in kinds:
            return "|".join(f"({v})" for v in values if v)
        return tuple(sorted(set().union(*[v or () for v in values])))

    def _check_weighted(self, adapters, weights, adapter_name):
        self._check_names(adapters)
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if any(self.peft_config[a].modules_to_save for a in adapters):
            raise ValueError("cannot combine adapters that have modules_to_save")


class LoraModel(BaseTuner):
    """LoRA / InA adapters on a jt_lora model."""

    prefix = "lora_"
    config_cls = LoraConfig
    layer_cls = LoraLayer

    def _new_layer(self, config, key, module):
        return LoraLayer(module)

    def _update_layer(self, layer, adapter_name, config: LoraConfig, key):
        r, alpha = config.rank_for(key), config.alpha_for(key)
        layer.update_layer(adapter_name, r, alpha, config.scaling(r, alpha), config.lora_dropout,
                           config.lora_inhibition, config.enable_lora, config.init_lora_weights,
                           config.lora_inhibition_slope)

    def _mark_bias_trainable(self, adapter_ids):
        modes = {self.peft_config[a].bias for a in self.active_adapters if a in self.peft_config}
        if "all" in modes:
            for name, p in self.model.named_parameters():
                if name.endswith("bias") and id(p) not in adapter_ids:
                    p.start_grad()
        elif "lora_only" in modes:
            for _, layer in self.tuner_layers():
                if isinstance(layer, LoraLayer) and layer.base_layer.bias is not None:
                    layer.base_layer.bias.start_grad()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None):
        """A new adapter from existing ones, PEFT's ``combination_type``s:

        * ``'cat'``: exact, ``ΔW = Σ w_i·ΔW_i``: the A's (times ``w_i·scaling_i``) and B's are
          concatenated; the rank is the sum of ranks, scaling 1.
        * ``'linear'``: needs equal ranks and layouts; ``A = Σ ±sqrt|w_i s_i|·A_i`` and
          ``B = Σ sqrt|w_i s_i|·B_i`` (PEFT's formula, not ``Σ w_i ΔW_i``: cross terms remain).
        * ``'svd'``: truncated SVD of ``Σ w_i ΔW_i`` at ``svd_rank`` (default: the largest rank).

        The new adapter is added frozen and inactive, as in PEFT. InA adapters cannot be combined
        (the gate is non-linear).
        """
        self._check_weighted(adapters, weights, adapter_name)
        ina = [a for a in adapters if self.peft_config[a].lora_inhibition > 0]
        if ina:
            raise ValueError(f"cannot combine InA adapters {ina}: their update is non-linear")
        if combination_type not in ("cat", "linear", "svd"):
            raise ValueError(f"combination_type must be 'cat', 'linear' or 'svd', got {combination_type!r}")
        layers = [layer for _, layer in self.tuner_layers() if isinstance(layer, LoraLayer)]
        if combination_type == "linear":
            layouts = {(ly.r[a], ly.enable_lora[a]) for ly in layers for a in adapters if a in ly}
            if len(layouts) != 1:
                raise ValueError(f"combination_type='linear' needs adapters of the same rank and layout; found "
                                 f"(r, enable_lora) = {sorted(layouts, key=str)}")
            (r, enable), = layouts
            new_r = r
        else:
            ranks = [ly.r[a] * ly.groups(a) for ly in layers for a in adapters if a in ly]
            per_layer = [sum(ly.r[a] * ly.groups(a) for a in adapters if a in ly) for ly in layers]
            new_r = max(per_layer) if combination_type == "cat" else (svd_rank or max(ranks))
            enable = None
        first = self.peft_config[adapters[0]]
        config = first.replace(r=new_r, lora_alpha=new_r, use_rslora=False, enable_lora=enable, rank_pattern={},
                               alpha_pattern={}, target_modules=self._combined_targets(adapters),
                               init_lora_weights=True, lora_inhibition=0.0)
        self.inject_adapter(adapter_name, config)
        for layer in layers:
            if adapter_name not in layer:
                continue
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer]
            a_new, b_new = _combine(layer, present, combination_type, new_r)
            assign(layer.lora_A[adapter_name].weight, a_new)
            assign(layer.lora_B[adapter_name].weight, b_new)


def _combine(layer: LoraLayer, present, kind: str, new_r: int):
    """(A, B) of the combined adapter on one layer, as numpy, zero-padded to rank ``new_r``."""
    if kind == "linear":
        a = sum(math.copysign(math.sqrt(abs(w * layer.scaling[n])), w * layer.scaling[n])
                * layer.lora_A[n].weight.numpy() for n, w in present)
        b = sum(math.sqrt(abs(w * layer.scaling[n])) * layer.lora_B[n].weight.numpy() for n, w in present)
        return a, b
    if kind == "cat":
        a = np.concatenate([w * layer.scaling[n] * layer.lora_A[n].weight.numpy() for n, w in present], axis=0)
        b = np.concatenate([layer.full_b(n).numpy() for n, _ in present], axis=1)
    else:
        delta = sum(w * layer.get_delta_weight(n).numpy() for n, w in present)
        delta = delta.T if layer.fan_in_fan_out else delta  # [out, in]
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        k = min(new_r, len(s))
        a, b = vh[:k], u[:, :k] * s[:k]
    pad = new_r - a.shape[0]
    a = np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)], axis=0)
    b = np.concatenate([b, np.zeros((b.shape[0], pad), b.dtype)], axis=1)
    return a.astype("float32"), b.astype("float32")


class IA3Model(BaseTuner):
    """(IA)³ adapters on a jt_lora model."""

    prefix = "ia3_"
    config_cls = IA3Config
    layer_cls = IA3Layer

    def _prepare_config(self, config):
        config = super()._prepare_config(config)
        if config.feedforward_modules is None:
            config = config.replace(feedforward_modules=())
        return config

    @staticmethod
    def _is_feedforward(config: IA3Config, key: str) -> bool:
        ff = config.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, key) is not None
        return any(key.endswith(f) for f in ff)

    def _check_targets(self, config, targets):
        keys = {k for k, _ in targets}
        stray = [k for k, m in self._candidates() if k not in keys and linear_info(m) is not None
                 and self._is_feedforward(config, k)]
        if stray:
            raise ValueError(f"feedforward_modules must be a subset of target_modules; {stray[:4]} match "
                             f"feedforward_modules={config.feedforward_modules!r} but are not targeted")
        for key, module in targets:
            if isinstance(module, IA3Layer) and module.is_feedforward != self._is_feedforward(config, key):
                raise ValueError(f"{key} is {'' if module.is_feedforward else 'not '}a feed-forward layer for the "
                                 f"existing adapters; a new adapter cannot change that")

    def _new_layer(self, config, key, module):
        return IA3Layer(module, self._is_feedforward(config, key))

    def _update_layer(self, layer, adapter_name, config: IA3Config, key):
        layer.update_layer(adapter_name, config.init_ia3_weights, config.enable_ia3)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str):
        """A new adapter whose vectors are ``Σ w_i·l_i`` over the adapters present in each layer (PEFT)."""
        self._check_weighted(adapters, weights, adapter_name)
        enables = {self.peft_config[a].enable_ia3 for a in adapters}
        if len(enables) > 1:
            raise ValueError(f"cannot combine (IA)³ adapters with different enable_ia3: {sorted(enables, key=str)}")
        config = self.peft_config[adapters[0]].replace(
            target_modules=self._combined_targets(adapters),
            feedforward_modules=self._combined_targets(adapters, "feedforward_modules"))
        self.inject_adapter(adapter_name, config)
        for _, layer in self.tuner_layers():
            if isinstance(layer, IA3Layer) and adapter_name in layer:
                total = sum(w * layer.ia3_l[a].numpy() for a, w in zip(adapters, weights) if a in layer)
                assign(layer.ia3_l[adapter_name], np.zeros(layer.ia3_l[adapter_name].shape, "float32") + total)


TUNERS = {"LORA": LoraModel, "IA3": IA3Model}
