"""Shard folders (SPEC section 5): the layout, the ``wsshm-shard`` converter, the one reader, its
checks, and the built-in demo data."""
from .layout import (KINDS, MEMBERS, ShardFolderError, check_folder, index_path, index_paths, read_manifest,
                     select_subset, shard_paths)
from .reader import CorruptSample, Sample, ShardSet, decode_sample, open_shard_set, read_samples
from .verify import check_checksums, verify

__all__ = ["KINDS", "MEMBERS", "CorruptSample", "Sample", "ShardFolderError", "ShardSet", "check_checksums",
           "check_folder", "decode_sample", "index_path", "index_paths", "open_shard_set", "read_manifest",
           "read_samples", "select_subset", "shard_paths", "verify"]
