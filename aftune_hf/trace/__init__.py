"""The trace on disk: the ONLY package that knows its file names.

Layout (a valid Hugging Face Hub repository; ``docs/FORMAT.md`` is the specification)::

    README.md                              model card (written at finalize)
    aftune_trace.json                      header: format, contract, run id, schema, environment
    chain.jsonl                            one committed record per line (append-only)
    checkpoints/00000/step-00000005.safetensors      trainable tensors after a step
    anchors/00000/step-00000004/{params,optimizer,rng}.safetensors + anchor.json
                                           (one folder per 1 000 steps: the Hub's folder limit)
    root.json                              the trace root (written last)

:class:`TraceWriter` writes atomically (temp, fsync, rename, fsync dir); the chain line is
the commit point. :class:`TraceReader` treats every byte as hostile: strict paths, no
symlinks or special files, no pickle, bounded sizes, strict JSON and safetensors, tensor
schemas checked.

Example:
    >>> w = TraceWriter.create("runs/t", contract_digest=c.digest(), schema=schema)  # doctest: +SKIP
    >>> w.append(records.start_record(state=..., anchor=...))                       # doctest: +SKIP
    >>> TraceReader("runs/t").check_integrity().num_steps                           # doctest: +SKIP
"""

from .layout import (
    ANCHOR_PARTS, CARD, CHAIN, FORMAT, FORMAT_VERSION, HEADER, HUB_MAX_FILES, IGNORED, LOCK, ROOT, SIGNATURE, Anchor, Limits,
    Schema, anchor_files, anchor_path, check_schema, checkpoint_files, checkpoint_path, environment, file_count, schema_of,
    shard_count, step_of_path,
)  # fmt: skip
from .reader import Integrity, TraceReader
from .writer import Progress, TraceWriter, progress

__all__ = [
    "ANCHOR_PARTS", "CARD", "CHAIN", "FORMAT", "FORMAT_VERSION", "HEADER", "HUB_MAX_FILES", "IGNORED", "LOCK", "ROOT", "SIGNATURE", "Anchor",
    "Integrity", "Limits", "Progress", "Schema", "TraceReader", "TraceWriter", "anchor_files", "anchor_path", "check_schema",
    "checkpoint_files", "checkpoint_path", "environment", "file_count", "progress", "schema_of", "shard_count", "step_of_path",
]  # fmt: skip
