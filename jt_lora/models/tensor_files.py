"""Writing a dict of tensors as one safetensors file, atomically (adapters, optimiser state, models)."""
from typing import Dict

import numpy as np

from ..io.atomic import atomic_write_bytes

__all__ = ["save_safetensors"]


def save_safetensors(path, tensors: Dict[str, np.ndarray], metadata=None):
    from safetensors.numpy import save
    arrays = {k: np.ascontiguousarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in tensors.items()}
    atomic_write_bytes(path, save(arrays, metadata=metadata))
