"""Shard folders (SPEC section 5): the ``wsshm-shard`` converter, its checks, and the built-in demo data."""
from .layout import ShardFolderError, index_paths, read_manifest, select_subset, shard_paths
from .verify import verify

__all__ = ["ShardFolderError", "index_paths", "read_manifest", "select_subset", "shard_paths", "verify"]
