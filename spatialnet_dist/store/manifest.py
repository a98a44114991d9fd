"""Reading manifests: `<root>/<corpus>/manifest.json` is the one list of a corpus's complete shards.

Manifest (DESIGN.md, CONTRACT: shards, plus the vocabulary counts per split):
  {"schema_version": 1 or 2, "corpus", "created", "source", "classes": [...] or null,
   "tags": [...] or null (schema 2: the multi-label tag set, sorted; absent in schema 1: no tags),
   "tags_source": {"file", "labels", "images_tagged", "images_without_row": {"count", "first"},
                   "rows_without_image": {"count", "first"}} (only when a table beside the corpus gave the tags:
                   ucm-captions --tags; corpora.base.tags_source_note),
   "image_format": {"format": "png" | "jpeg" | "webp", "quality": 1-100 (lossy formats)} (how 8-bit images were
                   stored: shards convert --image-format; absent before it: png),
   "splits": {"<split>": {"samples", "captions", "questions", "questions_by_type": {type: n},
                          "tag_counts": {tag: images} (schema 2),
                          "shards": [{"name", "samples", "bytes", "sha256"}],
                          "word_counts": {word: n}, "answer_counts": {qtype: {raw answer: n}},
                          "band_stats": {"pixels", "mean", "std"} (rasters other than uint8: store/band_stats.py)}}}
"""

from __future__ import annotations

import json

from spatialnet_dist.errors import UserError
from spatialnet_dist.store import storage
from spatialnet_dist.store.schema import READABLE_SCHEMA_VERSIONS, manifest_path
from spatialnet_dist.store.storage import StoreError


def manifest_url(root: str, corpus: str) -> str:
    return storage.join(root, manifest_path(corpus))


def read_manifest(root: str, corpus: str) -> dict:
    url = manifest_url(root, corpus)
    try:
        manifest = json.loads(storage.read_bytes(url))
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"{url}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        found = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise StoreError(f"{url}: schema_version {found!r}, expected one of {list(READABLE_SCHEMA_VERSIONS)}")
    if not isinstance(manifest.get("splits"), dict):
        raise StoreError(f"{url}: no 'splits' object")
    _check_fields(manifest, url)
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_counts(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_count(n) for k, n in value.items())


def _expect(ok: bool, url: str, where: str, what: str) -> None:
    if not ok:
        raise StoreError(f"{url}: {where}: expected {what}")


def _check_fields(manifest: dict, url: str) -> None:
    """The fields readers use have their types, and shard names are plain file names (a damaged or hostile
    manifest is refused here, naming the field, rather than failing somewhere in a reader)."""
    classes = manifest.get("classes")
    _expect(classes is None or isinstance(classes, list) and all(isinstance(c, str) for c in classes),
            url, "classes", "a list of names or null")
    tags = manifest.get("tags")
    _expect(tags is None or isinstance(tags, list) and all(isinstance(t, str) for t in tags),
            url, "tags", "a list of names or null")
    _expect(isinstance(manifest.get("tags_source", {}), dict), url, "tags_source", "an object")
    for split, s in manifest["splits"].items():
        where = f"splits.{split}"
        _expect(isinstance(s, dict), url, where, "an object")
        for key in ("samples", "captions", "questions"):
            _expect(_is_count(s.get(key)), url, f"{where}.{key}", "a count")
        for key in ("questions_by_type", "tag_counts", "word_counts"):
            _expect(_is_counts(s.get(key, {})), url, f"{where}.{key}", "{name: count}")
        answers = s.get("answer_counts", {})
        _expect(isinstance(answers, dict) and all(_is_counts(c) for c in answers.values()),
                url, f"{where}.answer_counts", "{type: {answer: count}}")
        _expect(isinstance(s.get("shards"), list), url, f"{where}.shards", "a list")
        for i, shard in enumerate(s["shards"]):
            _expect(isinstance(shard, dict) and isinstance(shard.get("sha256"), str) and _is_count(shard.get("samples"))
                    and _is_count(shard.get("bytes")) and isinstance(shard.get("name"), str)
                    and shard["name"] not in ("", ".", "..") and "/" not in shard["name"] and "\\" not in shard["name"],
                    url, f"{where}.shards[{i}]", "{name: a file name, samples, bytes, sha256}")


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


TRAIN_SPLIT = "train"


def task_corpora(cfg, tasks) -> list[str]:
    """Corpora feeding any of `tasks` (enabled ones only), each once, in config order."""
    out: list[str] = []
    for task in tasks:
        tc = getattr(cfg.tasks, task)
        if tc.enabled:
            out += [c for c in tc.corpora if c not in out]
    return out


def train_split(manifest: dict, corpus: str, root: str) -> dict:
    splits = manifest.get("splits", {})
    if TRAIN_SPLIT not in splits:
        raise UserError(f"corpus {corpus} under {root}: manifest has no '{TRAIN_SPLIT}' split (has: {', '.join(splits) or 'none'})")
    return splits[TRAIN_SPLIT]
