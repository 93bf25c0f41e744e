"""GPT-2 in Jittor with LoRA / InA / (IA)³ adapters, laid out like microsoft/LoRA's model.

Parameter names follow the LoRA replication (``transformer.h.0.attn.c_attn.weight``,
Conv1D layout ``[in, out]``; ``lora_A``/``lora_B`` on ``c_attn``), so its
checkpoints and HF GPT-2 weights load as they are. The LM head is tied to
``wte``. Calling the model mirrors the reference: ``model(input_ids)`` returns
``(logits, presents)``; with ``lm_labels`` it returns ``(logits, loss)``.
"""
import math
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..backend import jt, nn
from ..nn.fused_attention import attention_core, attention_core_applies
from ..nn.fused_norm import gelu_tanh, layer_norm, use_fused_norm
from ..nn.ia3 import IA3Linear
from ..nn.kernels import attention_softmax, batched_matmul, fast_path_available
from ..nn.lora import INA_SLOPE, Linear, MergedLinear
from ..nn.modes import AdapterModule
from .kv_cache import KVCache, PlainCache, causal_mask

__all__ = ["GPT2Config", "GPT2LMModel", "MODEL_CARDS", "ADAPTERS", "causal_mask", "lm_loss", "token_losses"]

MODEL_CARDS = {
    "gpt2.sm": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2.md": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2.lg": dict(n_embd=1280, n_layer=36, n_head=20),
}
ADAPTERS = ("lora", "ina", "ia3", "none")


@dataclass
class GPT2Config:
    """Architecture and adapter settings (defaults: GPT-2 small with the LoRA paper's adapter)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # The LoRA replication trains with no dropout in the base model.
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    # Adapter: "lora", "ina" (LoRA + inhibition), "ia3" or "none".
    adapter: str = "lora"
    lora_attn_dim: int = 4            # r
    lora_attn_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_inhibition: float = 0.0      # InA level in [0, 1); "ina" needs > 0 to differ from LoRA
    lora_inhibition_slope: float = INA_SLOPE  # InA's leaky-ReLU slope (the InA code's, torch's default)
    lora_enable: Tuple[bool, ...] = (True, False, True)   # q, k, v parts of c_attn
    # (IA)3 rescales all of c_attn's output (q, k, v: PEFT's GPT-2 default, which the InA code uses;
    # (False, True, True) is the (IA)3 paper's k and v only) and the input of mlp.c_proj
    ia3_enable: Tuple[bool, ...] = (True, True, True)
    ia3_feedforward: bool = True
    merge_weights: bool = True        # merge adapters into weights on eval() when possible

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.adapter in ("lora", "ina") and self.lora_attn_dim <= 0:
            raise ValueError(f"lora_attn_dim (r) must be > 0 for adapter={self.adapter!r}")
        if not 0.0 <= self.lora_inhibition < 1.0:
            raise ValueError(f"lora_inhibition must be in [0, 1), got {self.lora_inhibition}")
        if not 0.0 <= self.lora_inhibition_slope < 1.0:
            raise ValueError(f"lora_inhibition_slope must be in [0, 1), got {self.lora_inhibition_slope}")
        self.lora_enable = tuple(self.lora_enable)
        self.ia3_enable = tuple(self.ia3_enable)

    @classmethod
    def from_card(cls, card: str, **overrides) -> "GPT2Config":
        """``gpt2.sm`` / ``gpt2.md`` / ``gpt2.lg`` with adapter overrides."""
        if card not in MODEL_CARDS:
            raise ValueError(f"unknown model card {card!r}; choose from {sorted(MODEL_CARDS)}")
        return cls(**{**MODEL_CARDS[card], **overrides})

    def to_dict(self):
        return asdict(self)

    def replace(self, **changes) -> "GPT2Config":
        return replace(self, **changes)


def gelu(x):
    """GPT-2's tanh approximation of GELU (one op each way on the CPU fast path: ``nn.fused_norm``)."""
    if use_fused_norm():
        return gelu_tanh(x)
    return 0.5 * x * (1.0 + jt.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class LayerNorm(jt.Module):
    def __init__(self, n: int, eps: float):
        self.weight = jt.ones((n,), dtype="float32")
        self.bias = jt.zeros((n,), dtype="float32")
        self.eps = eps

    def execute(self, x):
        if use_fused_norm():
            return layer_norm(x, self.weight, self.bias, self.eps)
        u = x.mean(-1, keepdims=True)
        d = x - u
        s = (d * d).mean(-1, keepdims=True)
        return self.weight * (d / jt.sqrt(s + self.eps)) + self.bias


def _dropout(module, x, p):
    return nn.dropout(x, p, is_train=True) if p > 0 and module.training else x


def _c_attn(cfg: GPT2Config):
    n = cfg.n_embd
    if cfg.adapter in ("lora", "ina"):
        inhibition = cfg.lora_inhibition if cfg.adapter == "ina" else 0.0
        return MergedLinear(n, 3 * n, r=cfg.lora_attn_dim, lora_alpha=cfg.lora_attn_alpha,
                            lora_dropout=cfg.lora_dropout, enable_lora=cfg.lora_enable,
                            fan_in_fan_out=True, lora_inhibition=inhibition,
                            lora_inhibition_slope=cfg.lora_inhibition_slope,
                            merge_weights=cfg.merge_weights and inhibition == 0.0)
    if cfg.adapter == "ia3" and any(cfg.ia3_enable):
        return IA3Linear(n, 3 * n, enable_ia3=cfg.ia3_enable, fan_in_fan_out=True,
                         merge_weights=cfg.merge_weights)
    return Linear(n, 3 * n, fan_in_fan_out=True)


def _mlp_c_proj(cfg: GPT2Config):
    if cfg.adapter == "ia3" and cfg.ia3_feedforward:
        return IA3Linear(4 * cfg.n_embd, cfg.n_embd, feedforward=True, fan_in_fan_out=True,
                         merge_weights=cfg.merge_weights)
    return Linear(4 * cfg.n_embd, cfg.n_embd, fan_in_fan_out=True)


class Attention(AdapterModule):
    def __init__(self, cfg: GPT2Config):
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_pdrop = cfg.resid_pdrop
        self.c_attn = _c_attn(cfg)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, fan_in_fan_out=True)

    def _split(self, x):  # [B, T, C] -> [B, H, T, D]
        b, t, c = x.shape
        return x.reshape(b, t, self.n_head, c // self.n_head).transpose(0, 2, 1, 3)

    def execute(self, x, cache: KVCache, layer: int, head_mask=None, want_probs=False):
        """x [B, T, C] -> (out [B, T, C], probs [B, H, T, T_total] or None); the cache supplies
        the keys and values of earlier positions and keeps this call's (``models.kv_cache``)."""
        qkv = self.c_attn(x)  # [B, T, 3C]
        dense = self.dense if head_mask is None and not want_probs else \
            (lambda qkv_, past_kv, bias_mask: self.dense(qkv_, past_kv, bias_mask, head_mask, want_probs))
        a, probs = cache.attend(layer, qkv, dense)
        return _dropout(self, self.c_proj(a), self.resid_pdrop), probs

    def dense(self, qkv, past_kv, bias_mask, head_mask=None, want_probs=False):
        """Masked softmax attention of ``qkv`` [B, T, 3C] over ``past_kv`` and its own keys.

        Returns (a [B, T, C], (k, v) each [B, H, T_past+T, D], probs or None).
        """
        n = self.n_embd
        keep, add = bias_mask  # the reference's w*b - 1e10*(1-b), then softmax
        if (past_kv is None and head_mask is None and not want_probs and not (self.attn_pdrop > 0 and self.training)
                and attention_core_applies(qkv, keep, self.n_head)):
            # one op each way, q/k/v read in place (nn.fused_attention); k and v below are only
            # computed when the caller uses the presents (Jittor is lazy)
            a = attention_core(qkv, keep, self.n_head, math.sqrt(n // self.n_head))
            return a, tuple(self._split(qkv[:, :, i * n:(i + 1) * n]) for i in (1, 2)), None
        q, k, v = (self._split(qkv[:, :, i * n:(i + 1) * n]) for i in range(3))
        if past_kv is not None:
            k = jt.concat([past_kv[0], k], dim=2)
            v = jt.concat([past_kv[1], v], dim=2)
        probs = attention_softmax(batched_matmul(q, k, transpose_b=True), keep, add, math.sqrt(v.shape[-1]))
        probs = _dropout(self, probs, self.attn_pdrop)
        if head_mask is not None:
            probs = probs * head_mask.reshape(1, -1, 1, 1)
        a = batched_matmul(probs, v)  # [B, H, Tq, D]
        b, h, t, d = a.shape
        return a.transpose(0, 2, 1, 3).reshape(b, t, h * d), (k, v), (probs if want_probs else None)


class MLP(AdapterModule):
    def __init__(self, cfg: GPT2Config):
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, fan_in_fan_out=True)
        self.c_proj = _mlp_c_proj(cfg)
        self.resid_pdrop = cfg.resid_pdrop

    def execute(self, x):
        return _dropout(self, self.c_proj(gelu(self.c_fc(x))), self.resid_pdrop)


class Block(AdapterModule):
    def __init__(self, cfg: GPT2Config):
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def execute(self, x, cache: KVCache, layer: int, head_mask=None, ffn_mask=None, want_probs=False):
        a, probs = self.attn(self.ln_1(x), cache, layer, head_mask, want_probs)
        x = x + a
        m = self.mlp(self.ln_2(x))
        if ffn_mask is not None:
            m = m * ffn_mask
        return x + m, probs


class Embedding(jt.Module):
    def __init__(self, num: int, dim: int, std: float):
        self.weight = jt.array(np.random.normal(0, std, (num, dim)).astype("float32"))

    def execute(self, ids):
        return self.weight[ids]


class GPT2Model(AdapterModule):
    def __init__(self, cfg: GPT2Config):
        self.config = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, cfg.initializer_range)
        self.wpe = Embedding(cfg.n_positions, cfg.n_embd, cfg.initializer_range)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)

    def execute(self, input_ids, past=None, position_ids=None, attention_mask=None,
                head_mask=None, ffn_mask=None, output_attentions=False):
        """input_ids [B, T] -> hidden [B, T, C], presents, attentions.

        Args:
            past: per layer ``(k, v)``, each ``[B, H, T_past, D]`` (from a previous call), or any
                ``models.kv_cache.KVCache`` (the beam search's caches), which then owns its mask.
            position_ids: [B, T]; default ``T_past .. T_past+T-1``.
            attention_mask: [B, T_past+T], 1 for real tokens, 0 for padding keys.
            head_mask: [n_layer, n_head] multipliers on attention probabilities.
            ffn_mask: [n_layer] multipliers on each feed-forward block's output.

        Returns (hidden, presents, attentions): presents are what the cache's ``finish`` gives,
        the per-layer ``(k, v)`` for a ``past`` given as tuples (or none).
        """
        b, t = input_ids.shape
        cache = past if isinstance(past, KVCache) else PlainCache(past)
        cache.start(t, attention_mask, inspect=head_mask is not None or output_attentions)
        t_past = cache.length
        if position_ids is None:
            position_ids = jt.arange(t_past, t_past + t).int32().reshape(1, t).broadcast((b, t))
        x = self.wte(input_ids) + self.wpe(position_ids)
        x = _dropout(self, x, self.config.embd_pdrop)
        attentions = []
        for i, block in enumerate(self.h):
            x, probs = block(x, cache, i,
                             None if head_mask is None else head_mask[i],
                             None if ffn_mask is None else ffn_mask[i],
                             output_attentions)
            if output_attentions:
                attentions.append(probs)
        return self.ln_f(x), cache.finish(), attentions


class GPT2LMModel(AdapterModule):
    """GPT-2 with an LM head tied to the token embedding.

    Args:
        config: a ``GPT2Config`` (see ``GPT2Config.from_card``).
    """
    config_class = GPT2Config  # as HF's PreTrainedModel: checkpoint readers build configs without importing this module

    def __init__(self, config: GPT2Config):
        self.config = config
        self.transformer = GPT2Model(config)
        self._init_weights()
        self._init_frozen_base()

    def _init_weights(self):
        """The reference's init: projection weights N(0, 0.02), biases 0 (adapters keep theirs)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (Linear, MergedLinear, IA3Linear)):
                m.weight.update(jt.array(np.random.normal(0, std, m.weight.shape).astype("float32")))
                if m.bias is not None:
                    m.bias.update(jt.zeros(m.bias.shape, dtype="float32"))

    def _init_frozen_base(self):
        """Adapters present: the base is frozen and only adapters train (as loralib users expect)."""
        if self.config.adapter != "none":
            from ..nn.adapters import mark_only_adapter_as_trainable
            mark_only_adapter_as_trainable(self)

    @classmethod
    def from_pretrained(cls, path, config: Optional[GPT2Config] = None, strict: bool = True, **overrides):
        """Load GPT-2 weights: HF ``pytorch_model.bin``, ``model.safetensors``, a HF directory
        (config.json + weights) or a microsoft/LoRA checkpoint. Torch is not needed.

        Without ``config`` the model is the plain GPT-2 (``adapter="none"``), as transformers
        loads it and microsoft/LoRA builds it with ``lora_attn_dim=0``, so it can go straight into
        ``get_peft_model``. ``overrides`` set config fields; a native adapter is asked for with
        ``adapter="lora"|"ina"|"ia3"`` (adapter fields without ``adapter`` are an error).
        """
        from .checkpoint import load_gpt2_checkpoint
        if config is None and "adapter" not in overrides:
            asked = sorted(k for k in overrides if k.startswith(("lora_", "ia3_")))
            if asked:
                raise ValueError(f"from_pretrained got adapter fields {asked} but no adapter: pass "
                                 f"adapter='lora', 'ina' or 'ia3' (the default is the plain model)")
            overrides["adapter"] = "none"
        return load_gpt2_checkpoint(cls, path, config=config, strict=strict, **overrides)

    def save_pretrained(self, out_dir):
        """Base weights as a HF GPT-2 directory (config.json + model.safetensors)."""
        from .saving import save_pretrained
        save_pretrained(self, out_dir)

    def logits(self, hidden):
        """``hidden @ wteᵀ``. On the CPU oneDNN reads the tied head transposed in place;
        ``nn.matmul_transpose`` materialises the 50257 x n_embd transpose on every call."""
        wte = self.transformer.wte.weight
        if not fast_path_available():
            return nn.matmul_transpose(hidden, wte)
        flat = hidden.reshape((1, -1, hidden.shape[-1]))
        out = batched_matmul(flat, wte.unsqueeze(0), transpose_b=True)
        return out.reshape(tuple(hidden.shape[:-1]) + (wte.shape[0],))

    def execute(self, input_ids, lm_labels=None, lm_mask=None, past=None, label_smooth=0.0,
                position_ids=None, attention_mask=None, head_mask=None, ffn_mask=None,
                output_attentions=False):
        """Reference-compatible call.

        Returns ``(logits [B,T,V], presents)``; with ``lm_labels`` ``(logits, loss)``; with
        ``output_attentions`` a third item, the per-layer attention probabilities.
        """
        hidden, presents, attentions = self.transformer(
            input_ids, past=past, position_ids=position_ids, attention_mask=attention_mask,
            head_mask=head_mask, ffn_mask=ffn_mask, output_attentions=output_attentions)
        logits = self.logits(hidden)
        second = presents if lm_labels is None else lm_loss(logits, lm_labels, lm_mask, label_smooth)
        return (logits, second, attentions) if output_attentions else (logits, second)


def token_losses(logits, labels, label_smooth: float = 0.0):
    """Per-token loss [B, T] as the reference: ``(1-ε)·nll + ε·mean_v(-log p_v)``."""
    lse = jt.nn.logsumexp(logits, dim=-1)  # [B, T]
    picked = jt.gather(logits, -1, labels.int32().unsqueeze(-1)).squeeze(-1)
    nll = lse - picked
    if label_smooth > 0.0001:
        return (1.0 - label_smooth) * nll + label_smooth * (lse - logits.mean(-1))
    return nll


def lm_loss(logits, labels, mask=None, label_smooth: float = 0.0):
    """The reference's masked token loss: ``sum(loss·mask) / (sum(mask) + 1e-4)``."""
    loss = token_losses(logits, labels, label_smooth)
    if mask is None:
        mask = jt.ones(loss.shape, dtype=loss.dtype)
    mask = mask.float32()
    return (loss * mask).sum() / (mask.sum() + 0.0001)
