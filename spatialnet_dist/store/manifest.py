"""Reading manifests: `<root>/<corpus>/manifest.json` is the one list of a corpus's complete shards.

Manifest (DESIGN.md, CONTRACT: shards, plus the vocabulary counts per split):
  {"schema_version": 1, "corpus", "created", "source", "classes": [...] or null,
   "splits": {"<split>": {"samples", "captions", "questions", "questions_by_type": {type: n},
                          "shards": [{"name", "samples", "bytes", "sha256"}],
                          "word_counts": {word: n}, "answer_counts": {qtype: {raw answer: n}},
                          "band_stats": {"pixels", "mean", "std"} (rasters other than uint8: store/band_stats.py)}}}
"""

from __future__ import annotations

import json

from spatialnet_dist.store import storage
from spatialnet_dist.store.schema import SCHEMA_VERSION, manifest_path
from spatialnet_dist.store.storage import StoreError


def manifest_url(root: str, corpus: str) -> str:
    return storage.join(root, manifest_path(corpus))


def read_manifest(root: str, corpus: str) -> dict:
    url = manifest_url(root, corpus)
    try:
        manifest = json.loads(storage.read_bytes(url))
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"{url}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        found = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise StoreError(f"{url}: schema_version {found!r}, expected {SCHEMA_VERSION}")
    if not isinstance(manifest.get("splits"), dict):
        raise StoreError(f"{url}: no 'splits' object")
    return manifest


def shard_urls(root: str, corpus: str, split: str, manifest: dict | None = None) -> list[str]:
    """Full URLs of the shards of one split, in manifest order (pass `manifest` to skip re-reading it)."""
    manifest = manifest or read_manifest(root, corpus)
    splits = manifest["splits"]
    if split not in splits:
        raise StoreError(
            f"{manifest_url(root, corpus)}: no split {split!r} (splits: {', '.join(sorted(splits)) or 'none'})"
        )
    return [storage.join(root, corpus, split, shard["name"]) for shard in splits[split]["shards"]]


def list_corpora(root: str) -> list[str]:
    """Sorted names of the corpora under a store root (its folders that hold a manifest.json)."""
    return [name for name in storage.list_dir(root) if storage.exists(manifest_url(root, name))]


def resolve_corpora(url: str) -> tuple[str, list[str]]:
    """A store root or one corpus folder -> (root, corpus names)."""
    if storage.exists(storage.join(url, "manifest.json")):
        root, corpus = storage.split_url(url)
        return root, [corpus]
    corpora = list_corpora(url)
    if not corpora:
        raise StoreError(f"{url}: no corpus here (expected <corpus>/manifest.json or manifest.json)")
    return str(url), corpora
