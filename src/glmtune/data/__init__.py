"""Data: files -> samples (messages) -> (ids, labels) -> batches. See readers, encode, collate, cache, inspect."""

from glmtune.data.collate import collate, collate_packed, pack, packed_attention_mask, position_kind
from glmtune.data.encode import EvalExample, encode_samples, eval_examples
from glmtune.data.messages import RecordError, Sample
from glmtune.data.readers import ReadOptions, ReadReport, read_samples

__all__ = [
    "EvalExample",
    "ReadOptions",
    "ReadReport",
    "RecordError",
    "Sample",
    "collate",
    "collate_packed",
    "encode_samples",
    "eval_examples",
    "pack",
    "packed_attention_mask",
    "position_kind",
    "read_samples",
]
