"""Feature cache for frozen backbones: tiered store, cached backbone, cache-aware data path."""

from dbf_ext.cache.cached_backbone import CachedBackbone, weights_fingerprint
from dbf_ext.cache.data import (
    BatchKeys,
    CacheableDataset,
    CacheAwareDataset,
    CacheAwareSample,
    PlaceholderMiss,
    cache_aware_collate,
)
from dbf_ext.cache.layout import STORAGE_DTYPES, SlabLayout
from dbf_ext.cache.store import TIERS, CacheStats, FeatureCache

__all__ = [
    "BatchKeys",
    "CacheAwareDataset",
    "CacheAwareSample",
    "CacheableDataset",
    "PlaceholderMiss",
    "cache_aware_collate",
    "STORAGE_DTYPES",
    "TIERS",
    "CacheStats",
    "CachedBackbone",
    "FeatureCache",
    "SlabLayout",
    "weights_fingerprint",
]
