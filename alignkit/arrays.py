"""Input conversion shared by the measures (CKA, spectral): torch or numpy in, a float tensor out."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


def as_float_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """``x`` as a floating torch tensor (no copy when possible), kept on CPU or CUDA.

    Integer and boolean input becomes float64; complex input and other types raise TypeError
    naming ``name``. Devices without float64 (e.g. MPS) are moved to the CPU.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} must hold real numbers, got numpy dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        t = t.cpu()
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t
