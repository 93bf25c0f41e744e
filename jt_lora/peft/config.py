"""Adapter configurations with HF PEFT's names, defaults and JSON format.

``LoraConfig`` and ``IA3Config`` take the fields of ``peft.LoraConfig`` /
``peft.IA3Config`` that jt_lora implements, plus three of its own:
``lora_inhibition`` (InA; the field name of the InA reference implementation),
``lora_inhibition_slope`` (the InA gate's leaky-ReLU slope) and ``enable_lora``
(loralib's per-part mask on a fused projection such as GPT-2's ``c_attn`` =
q|k|v). Every value is checked when the config is built,
so a bad config fails at construction, not halfway through injection.

``from_dict`` reads an ``adapter_config.json`` written by PEFT or by jt_lora:
PEFT fields that jt_lora does not implement are accepted only at their default
value (anything else would silently compute something different), and unknown
fields are ignored with a warning, as PEFT itself does for newer files.
"""
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Dict, Optional, Tuple, Union

__all__ = ["PeftConfig", "LoraConfig", "IA3Config", "config_from_dict", "TASK_TYPES", "DEFAULT_TARGETS",
           "pattern_value"]

Targets = Union[None, str, Tuple[str, ...]]

TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
ALL_LINEAR = "all-linear"

# PEFT's defaults for GPT-2, except that LoRA adapts only q and v of c_attn (the LoRA paper's choice).
DEFAULT_TARGETS = {
    "LORA": {"gpt2": dict(target_modules=("c_attn",), enable_lora=(True, False, True))},
    # (IA)³: PEFT's GPT-2 default, all of c_attn and the feed-forward input; GPT2Config(adapter="ia3")
    # has the same default. The (IA)³ paper's k and v only: IA3Config(enable_ia3=(False, True, True)).
    "IA3": {"gpt2": dict(target_modules=("c_attn", "mlp.c_proj"), feedforward_modules=("mlp.c_proj",))},
}

# PEFT fields that only describe the file or the training set-up: ignored on load.
_INFORMATIONAL = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config"}
# PEFT fields jt_lora does not implement, with the value that means "off": any other value is an error.
_UNSUPPORTED_AT_DEFAULT = {
    "LORA": {"use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
             "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
             "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None, "loftq_config": {},
             "megatron_config": None, "eva_config": None, "corda_config": None, "arrow_config": None,
             "kasa_config": None, "lora_ga_config": None, "monteclora_config": None, "velora_config": None,
             "ensure_weight_tying": False},
    "IA3": {},
}


def _names(value, what: str) -> Targets:
    """None, a regex string, or a sorted tuple of module names (PEFT turns lists into sets)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return tuple(sorted(set(value)))
    raise TypeError(f"{what} must be None, a regex string or a list of module names, got {value!r}")


def _mask(value, what: str) -> Optional[Tuple[bool, ...]]:
    """A per-part mask (``enable_lora`` / ``enable_ia3``) as a tuple of bools, or None."""
    if value is None:
        return None
    if isinstance(value, str) or len(value) == 0 or not any(value):
        raise ValueError(f"{what} must be a non-empty sequence of bools with at least one True, got {value!r}")
    return tuple(bool(e) for e in value)


def _check_pattern(pattern: Dict[str, float], what: str, integer: bool):
    if not isinstance(pattern, dict):
        raise TypeError(f"{what} must be a dict of module pattern -> value, got {pattern!r}")
    for key, value in pattern.items():
        ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
        if not isinstance(key, str) or not ok or value <= 0:
            raise ValueError(f"{what}[{key!r}] must be a positive {'integer' if integer else 'number'}, got {value!r}")


def pattern_value(pattern: Dict[str, float], key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern that ends ``key`` at a name boundary."""
    for p in pattern:
        if re.match(rf"(.*\.)?({p})$", key):
            return pattern[p]
    return default


class PeftConfig:
    """What LoraConfig and IA3Config share: JSON round trip and the PEFT type tag."""

    peft_type = ""

    def _check_common(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        self.target_modules = _names(self.target_modules, "target_modules")
        self.exclude_modules = _names(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            names = [self.modules_to_save] if isinstance(self.modules_to_save, str) else self.modules_to_save
            self.modules_to_save = _names(names, "modules_to_save")
            if any(m.split(".")[-1] == "wte" for m in self.modules_to_save):
                raise ValueError("modules_to_save cannot hold 'wte': the LM head is tied to it, so a per-adapter "
                                 "copy would change the head too")

    def to_dict(self) -> dict:
        """Every field, JSON-ready (tuples as lists), with ``peft_type``."""
        out = {"peft_type": self.peft_type}
        for k, v in asdict(self).items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes):
        return replace(self, **changes)

    @staticmethod
    def from_dict(data: dict) -> "PeftConfig":
        return config_from_dict(data)


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (and InA) settings, named as ``peft.LoraConfig``.

    Args:
        r: rank of each low-rank update (> 0).
        lora_alpha: scaling numerator: the update is scaled by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the input of the low-rank path, in [0, 1).
        lora_inhibition: InA's inhibition level in [0, 1); 0 is plain LoRA. InA gates the rank
            activations ``h = A·x`` per token as ``leaky_relu(h - inhibition·max_r(h), slope)``, the
            InA reference's formula (the max over each adapted part's rank with ``enable_lora``).
        lora_inhibition_slope: the leaky-ReLU negative slope of the InA gate; 0.01 (torch's default,
            which the InA reference uses).
        target_modules: a regex (full match on the module name), a list of names or name suffixes,
            ``'all-linear'``, or None for the architecture's default (GPT-2: ``c_attn``).
        exclude_modules: names never adapted, matched like ``target_modules``.
        enable_lora: per-part mask for fused projections, loralib's ``MergedLinear``: a targeted layer
            whose ``out_features == len(enable_lora) * in_features`` (GPT-2's ``c_attn`` = q|k|v) gets
            one rank-``r`` pair per enabled part; other layers get a plain LoRA. None: plain LoRA
            everywhere (PEFT); with ``target_modules=None`` on GPT-2 it defaults to ``(True, False, True)``.
        fan_in_fan_out: the layer stores its weight as ``[in, out]`` (GPT-2 Conv1D). jt_lora layers
            know their layout, so the value is taken from the targeted layers (and saved as such).
        bias: which biases train and are saved: ``'none'``, ``'all'`` (every bias in the model) or
            ``'lora_only'`` (biases of adapted layers).
        modules_to_save: modules trained in full, as a per-adapter copy, and saved with the adapter.
        init_lora_weights: True (A kaiming-uniform, B zero: step 0 equals the base model),
            ``'gaussian'`` (A normal with std 1/r, B zero) or False (B random too; for tests).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        rank_pattern, alpha_pattern: per-module overrides of r / lora_alpha, keyed by module-name
            patterns (PEFT's semantics: the pattern must end the module name at a dot boundary).
        task_type, base_model_name_or_path, revision: recorded in adapter_config.json.
        inference_mode: adapters load frozen.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    lora_inhibition: float = 0.0
    lora_inhibition_slope: float = 0.01
    target_modules: Targets = None
    exclude_modules: Targets = None
    enable_lora: Optional[Tuple[bool, ...]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[Tuple[str, ...]] = None
    init_lora_weights: Union[bool, str] = True
    use_rslora: bool = False
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    peft_type = "LORA"

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.lora_inhibition < 1.0:
            raise ValueError(f"lora_inhibition must be in [0, 1), got {self.lora_inhibition}")
        if not 0.0 <= self.lora_inhibition_slope < 1.0:
            raise ValueError(f"lora_inhibition_slope must be in [0, 1), got {self.lora_inhibition_slope}")
        self.enable_lora = _mask(self.enable_lora, "enable_lora")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian' (jt_lora implements no other "
                             f"initialisation), got {self.init_lora_weights!r}")
        _check_pattern(self.rank_pattern, "rank_pattern", integer=True)
        _check_pattern(self.alpha_pattern, "alpha_pattern", integer=False)
        self._check_common()

    def rank_for(self, key: str) -> int:
        return pattern_value(self.rank_pattern, key, self.r)

    def alpha_for(self, key: str) -> float:
        return pattern_value(self.alpha_pattern, key, self.lora_alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class IA3Config(PeftConfig):
    """(IA)³ settings, named as ``peft.IA3Config``.

    Args:
        target_modules: as ``LoraConfig``; None on GPT-2 means ``c_attn`` and ``mlp.c_proj``.
        exclude_modules: names never adapted.
        feedforward_modules: targets whose input (not output) is rescaled; must be a subset of
            ``target_modules`` when both are lists. None on GPT-2 with default targets: ``mlp.c_proj``.
        fan_in_fan_out: as ``LoraConfig``.
        modules_to_save: as ``LoraConfig``.
        init_ia3_weights: vectors start at ones (step 0 equals the base model); False draws them
            around one (for tests).
        enable_ia3: jt_lora's per-part mask for a fused output (GPT-2's ``c_attn`` = q|k|v), as
            ``enable_lora``: only the enabled parts get a learned vector, the others stay exactly as
            they are. None: the whole output (PEFT's default). ``(False, True, True)`` is k and v, the
            (IA)³ paper's choice and ``GPT2Config(adapter="ia3")``'s.
            Files hold the full vector (ones on the other parts), so stock PEFT reads them exactly.
    """

    target_modules: Targets = None
    exclude_modules: Targets = None
    feedforward_modules: Targets = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[Tuple[str, ...]] = None
    init_ia3_weights: bool = True
    enable_ia3: Optional[Tuple[bool, ...]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    peft_type = "IA3"

    def __post_init__(self):
        self._check_common()
        self.feedforward_modules = _names(self.feedforward_modules, "feedforward_modules")
        if isinstance(self.feedforward_modules, tuple) and isinstance(self.target_modules, tuple):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules must be a subset of target_modules; not targeted: {extra} "
                                 f"(target_modules={list(self.target_modules)})")
        if not isinstance(self.init_ia3_weights, bool):
            raise TypeError(f"init_ia3_weights must be a bool, got {self.init_ia3_weights!r}")
        self.enable_ia3 = _mask(self.enable_ia3, "enable_ia3")


CONFIG_CLASSES = {"LORA": LoraConfig, "IA3": IA3Config}


def config_from_dict(data: dict) -> PeftConfig:
    """A config from adapter_config.json contents (PEFT's or jt_lora's)."""
    data = dict(data)
    peft_type = data.pop("peft_type", None)
    if peft_type not in CONFIG_CLASSES:
        raise ValueError(f"peft_type {peft_type!r} is not supported by jt_lora (supported: {sorted(CONFIG_CLASSES)})")
    cls = CONFIG_CLASSES[peft_type]
    known = {f.name for f in fields(cls)}
    kwargs, ignored = {}, []
    for key, value in data.items():
        if key in known:
            kwargs[key] = value
        elif key in _UNSUPPORTED_AT_DEFAULT[peft_type]:
            default = _UNSUPPORTED_AT_DEFAULT[peft_type][key]
            if value != default and not (not value and not default):  # null, false, {} all mean "off"
                raise ValueError(f"adapter_config.json sets {key}={value!r}; jt_lora does not implement {key} "
                                 f"(only {default!r} can be loaded)")
        elif key not in _INFORMATIONAL:
            ignored.append(key)
    if ignored:
        warnings.warn(f"adapter_config.json: ignoring fields jt_lora does not know: {sorted(ignored)}")
    return cls(**kwargs)
