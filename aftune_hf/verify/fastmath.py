"""float32 linear layers through oneDNN for the verifier's teacher-forced pass: the same precision, faster.

PyTorch's CPU ``F.linear`` runs float32 products through its BLAS (MKL in the pip wheels), which
on some CPUs (AMD EPYC, measured: docs/INFERENCE.md) is ~2.3x slower than oneDNN's float32 kernel.
:class:`OneDnnLinear` routes each float32 CPU ``F.linear`` to ``torch.ops.mkldnn._linear_pointwise``
-- float32 in, float32 arithmetic, float32 out (oneDNN's default math mode: never bf16) -- so it
only changes the order of summation, as another kernel path does. Anything else (other dtypes,
other devices, ``addmm`` layers such as GPT-2's ``Conv1D``) runs unchanged. The verifier treats
it as a fast first pass: a call any row of which fails it is checked again without it (``tokens.check_call``).

Example:
    >>> with OneDnnLinear():                                  # doctest: +SKIP
    ...     logits = model(input_ids=ids).logits
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def available() -> bool:
    """Whether this torch build has oneDNN's float32 linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDnnLinear(TorchFunctionMode):
    """Within the block, float32 CPU ``F.linear`` calls without autograd run on oneDNN's float32 kernel."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if _routable(x, w, b):
                return onednn_linear(x, w, b)
        return func(*args, **kwargs)


def _routable(x: Any, w: Any, b: Any) -> bool:
    """float32 CPU tensors of a plain linear layer, no autograd."""
    tensors = (x, w) if b is None else (x, w, b)
    return (all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not torch.is_grad_enabled() and w.dim() == 2 and x.dim() >= 2 and x.shape[-1] == w.shape[1])  # fmt: skip

def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + b`` on oneDNN's float32 kernel (no post-op, default math mode: float32 throughout)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
