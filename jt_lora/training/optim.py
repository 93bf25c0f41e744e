"""AdamW and learning-rate schedules exactly as the LoRA replication defines them.

The reference's AdamW (``examples/NLG/src/optimizer.py``) applies bias
correction only with ``correct_bias`` and decays weights *after* the Adam step
(``p -= lr·wd·p`` on the updated ``p``); its schedules step once per
micro-batch. Optimiser state is plain numpy-convertible tensors so a run can be
checkpointed and resumed bit for bit. Under MPI, gradients are averaged over
processes before the update.
"""
import math
from typing import Dict, List, Optional

import numpy as np

from ..backend import jt

__all__ = ["AdamW", "lr_lambda", "SCHEDULERS", "clip_grad_norm"]

SCHEDULERS = ("linear", "cosine", "constant", "none")


def lr_lambda(scheduler: str, step: int, warmup: int, max_step: int) -> float:
    """Multiplier of the base learning rate for micro-batch ``step`` (0-based), as the reference's
    schedulers give it: the first micro-batch trains at multiplier(0), i.e. 0 during warm-up.

    linear: warm up linearly, then decay linearly to 0 at ``max_step`` (get_linear_schedule_with_warmup);
    cosine: warm up, then half a cosine to 0 at ``max_step`` (CosineAnnealingWarmupRestarts, alpha=0);
    constant: warm up, then 1; none: always 1.
    """
    if scheduler == "none":
        return 1.0
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if scheduler == "cosine" and step == 0:
        return 0.0  # the reference's cosine scheduler resets the lr to min_lr=0 for the first step
    if step < warmup:
        return step / max(1, warmup)
    if scheduler == "constant":
        return 1.0
    if scheduler == "linear":
        return max(0.0, (max_step - step) / max(1, max_step - warmup))
    s = min(step, max_step)
    return 0.5 * (1 + math.cos(math.pi * s / max(1, max_step)))


def clip_grad_norm(grads: List["jt.Var"], max_norm: float):
    """torch.nn.utils.clip_grad_norm_: scale all grads by max_norm/(norm+1e-6) when above max_norm."""
    total = jt.sqrt(sum((g * g).sum() for g in grads))
    coef = jt.minimum(max_norm / (total + 1e-6), 1.0)
    return [g * coef for g in grads], total


class AdamW:
    """The reference AdamW over a fixed list of (name, parameter) pairs.

    Args:
        named_params: trainable parameters with stable names (used for checkpointing).
        lr, betas, eps, weight_decay, correct_bias: as the reference (eps default 1e-6).
    """

    def __init__(self, named_params, lr: float = 1e-3, betas=(0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        if not self.params:
            raise ValueError("no trainable parameters: did the model get adapters?")
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.correct_bias = correct_bias
        self.step_count = 0
        self.exp_avg = [jt.zeros(p.shape, dtype=p.dtype).stop_grad() for p in self.params]
        self.exp_avg_sq = [jt.zeros(p.shape, dtype=p.dtype).stop_grad() for p in self.params]

    def step(self, grads: List["jt.Var"], lr: Optional[float] = None):
        """One update with the given gradients (already accumulated/clipped)."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.step_count += 1
        step_size = lr
        if self.correct_bias:
            step_size = lr * math.sqrt(1.0 - b2 ** self.step_count) / (1.0 - b1 ** self.step_count)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            m = self.exp_avg[i] * b1 + g * (1.0 - b1)
            v = self.exp_avg_sq[i] * b2 + g * g * (1.0 - b2)
            new = p - step_size * m / (jt.sqrt(v) + self.eps)
            if self.weight_decay > 0.0:
                new = new - lr * self.weight_decay * new
            self.exp_avg[i].update(m.detach())
            self.exp_avg_sq[i].update(v.detach())
            p.update(new.detach())

    def state_dict(self) -> Dict[str, np.ndarray]:
        state = {"step_count": np.array(self.step_count, dtype=np.int64)}
        for n, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
            state[f"exp_avg.{n}"] = m.numpy()
            state[f"exp_avg_sq.{n}"] = v.numpy()
        return state

    def load_state_dict(self, state: Dict[str, np.ndarray]):
        missing = [n for n in self.names if f"exp_avg.{n}" not in state]
        if missing:
            raise ValueError(f"optimizer state lacks parameters {missing}")
        self.step_count = int(np.asarray(state["step_count"]).reshape(-1)[0])  # stored as a 1-element tensor
        for i, n in enumerate(self.names):
            self.exp_avg[i].update(jt.array(state[f"exp_avg.{n}"]))
            self.exp_avg_sq[i].update(jt.array(state[f"exp_avg_sq.{n}"]))
