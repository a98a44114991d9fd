"""The shard store: schema, storage (local and s3://), writer, manifests, inspect and verify."""

from spatialnet_dist.store.manifest import list_corpora, read_manifest, shard_urls
from spatialnet_dist.store.schema import Sample, SchemaError, decode_sample, encode_sample
from spatialnet_dist.store.storage import StoreError
from spatialnet_dist.store.writer import ShardWriter

__all__ = [
    "Sample",
    "SchemaError",
    "ShardWriter",
    "StoreError",
    "decode_sample",
    "encode_sample",
    "list_corpora",
    "read_manifest",
    "shard_urls",
]
