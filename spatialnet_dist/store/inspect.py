"""`spatialnet shards inspect`: counts per corpus, split and task, read from the manifests only."""

from __future__ import annotations

from spatialnet_dist.store.manifest import read_manifest, resolve_corpora


def inspect_store(url: str) -> dict:
    """A store root (every corpus) or one corpus folder -> {"root", "corpora": {corpus: {"splits", "classes", "tags",
    "image_only", "image_format"}}} ("classes", "tags": how many, None when the corpus has none; "image_only": it has
    no classes, tags, captions or questions, images alone: an unlabeled corpus, for pretraining; "image_format":
    the manifest's, {"format": "png"} for one written before conversion took --image-format)."""
    root, corpora = resolve_corpora(url)
    info = {"root": root, "corpora": {}}
    for corpus in corpora:
        manifest = read_manifest(root, corpus)
        splits = {}
        for split, s in manifest["splits"].items():
            splits[split] = {
                "samples": s["samples"],
                "captions": s["captions"],
                "questions": s["questions"],
                "questions_by_type": dict(s["questions_by_type"]),
                "shards": len(s["shards"]),
                "bytes": sum(shard["bytes"] for shard in s["shards"]),
            }
        classes, tags = manifest.get("classes"), manifest.get("tags")  # schema 1 manifests have no "tags"
        texts = sum(s["captions"] + s["questions"] for s in splits.values())
        info["corpora"][corpus] = {"splits": splits, "classes": len(classes) if classes is not None else None,
                                   "tags": len(tags) if tags else None,
                                   "image_only": classes is None and not tags and texts == 0,
                                   "image_format": manifest.get("image_format", {"format": "png"})}
    return info


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_inspect(info: dict) -> str:
    head = ("corpus", "split", "samples", "captions", "questions", "shards", "size", "questions by type")
    rows = []
    for corpus, c in info["corpora"].items():
        for split, s in c["splits"].items():
            by_type = ", ".join(f"{t} {n}" for t, n in s["questions_by_type"].items()) or "-"
            counts = (s["samples"], s["captions"], s["questions"], s["shards"])
            rows.append((corpus, split, *map(str, counts), _size(s["bytes"]), by_type))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    numeric = {2, 3, 4, 5, 6}
    lines = [f"store {info['root']}"]
    for r in [head, *rows]:
        cells = [v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    for corpus, c in info["corpora"].items():
        stored = c["image_format"]
        lossy = f"; 8-bit images as {stored['format']} quality {stored['quality']}" if "quality" in stored else ""
        if c["image_only"]:
            lines.append(f"{corpus}: image-only (no classes, tags, captions or questions){lossy}")
            continue
        lines.append(f"{corpus}: {c['classes'] if c['classes'] is not None else 'no'} classes, "
                     f"{c['tags'] if c['tags'] is not None else 'no'} tags{lossy}")
    return "\n".join(lines)
