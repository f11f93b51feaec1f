"""Data pipelines: dataset and source protocols, the resumable loader, shape probing."""

from .pipeline import (
    MAX_LEADING_FAILURES,
    SPLITS,
    Batch,
    Dataset,
    EmptyDatasetError,
    Example,
    PipelineLoader,
    Source,
    build_loader,
    collate,
    first_example,
    sample_rng,
    shard_indices,
)

__all__ = [
    "MAX_LEADING_FAILURES",
    "SPLITS",
    "Batch",
    "Dataset",
    "EmptyDatasetError",
    "Example",
    "PipelineLoader",
    "Source",
    "build_loader",
    "collate",
    "first_example",
    "sample_rng",
    "shard_indices",
]
