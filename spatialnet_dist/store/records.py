"""The JSON records of a split's shards without their images: all the text of a split (captions,
questions, answers, class names) at the cost of reading the tars, none of decoding them.

A local shard is read by seeking past its image members; an S3 body streams through them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from spatialnet_dist.store.manifest import read_manifest, shard_urls
from spatialnet_dist.store.schema import SchemaError, validate_record
from spatialnet_dist.store.shard_tar import count_problem, shard_samples
from spatialnet_dist.store.storage import StoreError, open_stream


def shard_records(url: str) -> Iterator[dict]:
    """The records (schema.Sample.record()) of one shard, in tar order; a bad shard is a StoreError naming it."""
    stream = open_stream(url)
    try:
        for sample in shard_samples(stream, url, exts={"json"}):  # UnreadableShard naming the shard
            if "json" not in sample:
                continue
            try:
                yield validate_record(json.loads(sample["json"]))
            except (ValueError, UnicodeDecodeError, SchemaError) as e:
                reason = str(e) if isinstance(e, SchemaError) else "not valid JSON"
                raise StoreError(f"shard {url}: member {sample['__key__']}.json: {reason}") from None
    finally:
        stream.close()


def split_records(root: str, corpus: str, split: str) -> Iterator[dict]:
    """The records of every shard the manifest lists for `split` of `corpus`, in manifest order; a shard
    with another number of records than listed (a tar cut at a member boundary reads cleanly) is refused."""
    manifest = read_manifest(root, corpus)
    for url, listed in zip(shard_urls(root, corpus, split, manifest), manifest["splits"][split]["shards"]):
        read = 0
        for record in shard_records(url):
            read += 1
            yield record
        if read != listed["samples"]:
            raise StoreError(f"shard {url}: {count_problem(read, listed['samples'])}")
