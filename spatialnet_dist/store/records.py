"""The JSON records of a split's shards without their images: all the text of a split (captions,
questions, answers, class names) at the cost of reading the tars, none of decoding them.

A local shard is read by seeking past its image members; an S3 body streams through them.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator

from spatialnet_dist.store.manifest import read_manifest, shard_urls
from spatialnet_dist.store.schema import SchemaError, validate_record
from spatialnet_dist.store.storage import StoreError, open_stream


def shard_records(url: str) -> Iterator[dict]:
    """The records (schema.Sample.record()) of one shard, in tar order; a bad shard is a StoreError naming it."""
    stream = open_stream(url)
    try:
        with tarfile.open(fileobj=stream, mode="r:*" if stream.seekable() else "r|*") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".json")):
                    continue
                try:
                    yield validate_record(json.loads(tar.extractfile(member).read()))
                except (ValueError, UnicodeDecodeError, SchemaError) as e:
                    reason = str(e) if isinstance(e, SchemaError) else "not valid JSON"
                    raise StoreError(f"shard {url}: member {member.name}: {reason}") from None
    except (tarfile.TarError, EOFError) as e:
        raise StoreError(f"shard {url}: not a readable tar ({e})") from None
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
            raise StoreError(f"shard {url}: {read} records, the manifest lists {listed['samples']}")
