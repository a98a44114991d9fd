"""`spatialnet shards verify`: re-read every shard a manifest lists, streaming, one pass per shard.

A shard is bad when it is missing, its size or sha256 differ from the manifest, it is not a readable
tar, a sample does not decode with the schema, or it holds another number of samples than listed.
"""

from __future__ import annotations

import hashlib
import sys
from typing import BinaryIO

from tqdm import tqdm

from spatialnet_dist.store import storage
from spatialnet_dist.store.manifest import read_manifest, resolve_corpora
from spatialnet_dist.store.schema import SchemaError, decode_sample
from spatialnet_dist.store.shard_tar import UnreadableShard, count_problem, shard_samples
from spatialnet_dist.store.storage import NotFoundError, StoreError


class _HashingReader:
    """Read-only wrapper that counts and hashes every byte read through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(2**20):
            pass


def verify_shard(url: str, entry: dict) -> list[str]:
    """-> the reasons this shard is bad ([] when it is good); `entry` is its manifest shard entry."""
    try:
        stream = storage.open_stream(url)
    except NotFoundError:
        return ["missing"]
    except StoreError as e:
        return [str(e)]
    reasons, samples, undecodable = [], 0, []
    reader = _HashingReader(stream)
    try:
        for members in shard_samples(reader, url):
            samples += 1
            try:
                decode_sample(members)
            except SchemaError as e:
                undecodable.append(str(e))
        reader.drain()
    except UnreadableShard as e:
        reasons.append(e.problem)
        reader.drain()
    finally:
        stream.close()
    if undecodable:
        reasons.append(f"{len(undecodable)} undecodable sample(s), first: {undecodable[0]}")
    if reader.bytes != entry["bytes"]:
        reasons.append(f"{reader.bytes} bytes, manifest says {entry['bytes']}")
    if reader.sha256.hexdigest() != entry["sha256"]:
        reasons.append("sha256 differs from the manifest")
    if samples != entry["samples"]:
        reasons.append(count_problem(samples, entry["samples"]))
    return reasons


def verify_store(url: str) -> list[tuple[str, str]]:
    """Every shard of every corpus under `url` (a store root or one corpus) -> [(bad shard URL, reason)]."""
    root, corpora = resolve_corpora(url)
    shards = []
    for corpus in corpora:
        for split, s in read_manifest(root, corpus)["splits"].items():
            shards += [(storage.join(root, corpus, split, entry["name"]), entry) for entry in s["shards"]]
    bad = []
    for shard_url, entry in tqdm(shards, desc="verify", unit=" shard", file=sys.stderr, disable=None):
        reasons = verify_shard(shard_url, entry)
        if reasons:
            bad.append((shard_url, "; ".join(reasons)))
    return bad
