"""Test tool: let accelerate run FSDP on CPU processes (gloo), for the FSDP tests.

accelerate 1.15 turns a multi-process run into ``DistributedType.FSDP`` only when its processes
are GPU-like (``AcceleratorState.__init__``, the ``MULTI_GPU``/``MULTI_NPU``/... branch), so on a
CPU-only machine ``TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2})`` silently trains
DDP. torch's FSDP2 (``fully_shard``) itself works on CPU over gloo. :func:`enable` wraps that
``__init__``: a ``MULTI_CPU`` state given an FSDP plugin becomes ``FSDP`` with it, as it would on
GPUs. Nothing else changes; the Trainer then prepares the model with accelerate's own FSDP2 path.
"""

from __future__ import annotations

import functools


def enable() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "_aftune_cpu_fsdp", False):
        return
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    __init__._aftune_cpu_fsdp = True
    AcceleratorState.__init__ = __init__
