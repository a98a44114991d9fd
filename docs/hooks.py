"""MkDocs hook (mkdocs.yml `hooks:`): the pages that are made at build time, never committed.

- reference/configuration.md: every config key, walked from a `spatialnet_dist.config.Config` as `config.load`
  makes it (its `tasks.<task>` sections come from the task registry then), with each key's type, default and the
  comment beside it in the schema's source.
- cluster.md, shards.md, benchmarks.md, results.md: cluster/README.md, shards/README.md, bench/README.md and
  bench/RESULTS.md as they are; those files stay the one home of their text, next to what they describe.
- api/<module>.md: `::: spatialnet_dist.<module>` for every top-level module and package (mkdocstrings renders
  them), listed under "API reference" in the nav.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import pkgutil
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the reference documents the checkout being built, not another installed copy
    sys.path.insert(0, str(REPO))
CONFIG_REFERENCE = "reference/configuration.md"
FOLDED = {"cluster.md": "cluster/README.md", "shards.md": "shards/README.md",
          "benchmarks.md": "bench/README.md", "results.md": "bench/RESULTS.md"}
API_NAV = "API reference"


def _package_modules() -> list[str]:
    import spatialnet_dist

    return sorted(m.name for m in pkgutil.iter_modules(spatialnet_dist.__path__))


# ---- the configuration reference ----


def _field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment, "" for none} for each field declared in the source of `cls`: the comment lines
    just above the field and the one after it on its line. A class made at run time (the tasks sections, with a
    task's own options) has no source: {}."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    lines: dict[int, list[tokenize.TokenInfo]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        lines.setdefault(tok.start[0], []).append(tok)
    for number in sorted(lines):
        toks = [t for t in lines[number] if t.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL,
                                                           tokenize.NEWLINE)]
        if not toks:
            above = []
        elif toks[0].type == tokenize.COMMENT:
            above.append(toks[0].string.lstrip("# "))
        elif (len(toks) > 1 and toks[0].type == tokenize.NAME and toks[1].string == ":"
              and toks[0].start[1] == 4):  # a field of the class body
            after = [t.string.lstrip("# ") for t in toks if t.type == tokenize.COMMENT]
            comments[toks[0].string] = " ".join(above + after)
            above = []
        else:
            above = []
    return comments


def _comments(cls: type) -> dict[str, str]:
    """Field comments of `cls` and the classes it derives from (a task's section: TaskConfig's keys)."""
    found: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            found.update(_field_comments(base))
    return found


def _type_text(tp) -> str:
    plain = isinstance(tp, type) and not typing.get_args(tp)  # int, str; not list[str], whose type is a type too
    return tp.__name__ if plain else str(tp).replace("typing.", "")


def _default_text(value) -> str:
    return "`\"\"`" if value == "" else f"`{value!r}`" if not isinstance(value, bool) else f"`{str(value).lower()}`"


def _markdown_escaped(text: str) -> str:
    """A source comment as table-cell text: `tasks.<task>` is no HTML tag, `|` no cell border, `*_loss` no
    emphasis, `[lo, hi][i]` no link."""
    for char, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "&#124;"), ("*", "\\*"), ("[", "\\[")):
        text = text.replace(char, escaped)
    return text


def _docstring(cls: type) -> str:
    """The class's own docstring; dataclass's generated signature is no description."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


def _rows(section, prefix: str, out: list[str]) -> None:
    cls = type(section)
    hints, comments = typing.get_type_hints(cls), _comments(cls)
    nested = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f.name, value))
            continue
        if f.name in comments:
            about = _markdown_escaped(comments[f.name])
        else:  # a field of a class made from the registry: a task's own option
            about = f"the task's own option: `options` in `spatialnet_dist/tasks/{prefix.split('.')[1]}.py`"
        out.append(f"| `{prefix}{f.name}` | `{_type_text(hints[f.name])}` | {_default_text(value)} | {about} |")
    for name, value in nested:
        _section(value, f"{prefix}{name}", out)


def _section(section, key: str, out: list[str]) -> None:
    out += ["", f"## `{key}`", ""]
    if doc := _docstring(type(section)):
        out += [_markdown_escaped(doc), ""]
    if any(not dataclasses.is_dataclass(getattr(section, f.name)) for f in dataclasses.fields(section)):
        out += ["| key | type | default | what it is |", "| --- | --- | --- | --- |"]
    _rows(section, f"{key}.", out)


def config_reference() -> str:
    """The Markdown page of every key of a run's config, with its type and default."""
    from spatialnet_dist import config

    cfg = config.load(None, [])
    out = ["# Configuration reference", "",
           "Every key of a run's config, generated from `spatialnet_dist.config` when these pages are built. Set "
           "them in a YAML file (`--config FILE`) or one by one (`--set key=value`, the value read as YAML); an "
           "unknown key or a value of the wrong type stops the job at once with one line naming the key. The "
           "defaults here are those of the schema; `configs/demo.yaml`, which `python ray_job.py` reads when no "
           "`--config` is given, overrides some of them. Each `tasks.<task>` section has the keys every task "
           "has, its own options after them."]
    for f in dataclasses.fields(cfg):
        _section(getattr(cfg, f.name), f.name, out)
    return "\n".join(out) + "\n"


# ---- mkdocs events ----


def on_config(config):
    """Add the API pages to the nav, one per module of the package."""
    pages = [{name: f"api/{name}.md"} for name in _package_modules()]
    config.nav = [entry for entry in config.nav if API_NAV not in entry] + [{API_NAV: pages}]
    return config


def on_files(files, config):
    generated = {CONFIG_REFERENCE: config_reference()}
    generated.update({page: (REPO / source).read_text() for page, source in FOLDED.items()})
    generated.update({f"api/{name}.md": f"# spatialnet_dist.{name}\n\n::: spatialnet_dist.{name}\n"
                      for name in _package_modules()})
    for uri, content in generated.items():
        files.append(File.generated(config, uri, content=content))
    return files
