"""Small HTML pieces of the report (every value from a file is escaped) and the scrubbing of file paths, which
never appear on the page."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from server.report.data import norm_key

# Configuration keys whose values are file system locations; never shown on the page.
_PATH_KEY_WORDS = ("dir", "path", "file", "cert", "key", "ledger", "home", "audit_log", "cache", "input")


# ----------------------------------------------------------------------------------------------------------
# small HTML helpers (every value that comes from a file is escaped)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    """A metric with a fixed number of decimals; an en dash when absent."""
    if value is None:
        return "&ndash;"
    if not math.isfinite(value):
        return _e(value)
    return f"{value:.{digits}f}"


def _int(value: float | None) -> str:
    """A count (sites, scans, bytes) with thousands separators; an en dash when absent."""
    if value is None or not math.isfinite(value):
        return "&ndash;"
    return f"{int(round(value)):,}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], *, row_classes: Sequence[str] | None = None,
           table_id: str = "", text_cols: int = 1, left_cols: Sequence[int] = ()) -> str:
    """An HTML table; ``header`` and cells are already-escaped HTML.

    The first ``text_cols`` columns (and the columns in ``left_cols``) hold text and are left-aligned; the
    others hold numbers.
    """
    def cell(tag: str, i: int, content: str) -> str:
        left = i < text_cols or i in left_cols
        return f'<{tag} class="name">{content}</{tag}>' if left else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        body.append(f"<tr{cls}>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _figure(title: str, content: str) -> str:
    """One titled cell of a ``.figs`` row (two per row on a wide page)."""
    return f"<figure><h3>{_e(title)}</h3>{content}</figure>"


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{_e(title)}</h2>{body}</section>'


def _absent(text: str) -> str:
    """The sentence a section shows instead of its content when the run did not produce it."""
    return f'<p class="note absent">{_e(text)}</p>'


# ----------------------------------------------------------------------------------------------------------
# sections


_PATH_RE = re.compile(r"(?<![\w.:])(?:~|[A-Za-z]:)?[/\\][\w.\-~/\\]+")


def _scrub_paths(text: str) -> str:
    """``text`` with anything that looks like a file path replaced, for notes the server wrote freely."""
    return _PATH_RE.sub("(path withheld)", text)


# Absolute (/x, ~/x, C:\\x) or explicitly relative (./x, ../x) paths, or a/b/c without spaces with a letter in it
# ("pretrain 1/2" and "1/2" are not paths).
_PATH_VALUE_RE = re.compile(r"^(?:~|\.{1,2}[/\\]|/|[A-Za-z]:[/\\])"
                            r"|^(?=[^\s]*[A-Za-z])[\w.\-]+(?:[/\\][\w.\-]+)+[/\\]?$")


def _looks_like_path(key: str, value: Any) -> bool:
    """Whether a configuration value names a file or directory (by its key's words or by its shape)."""
    if not isinstance(value, str) or value == "":
        return False
    key_words = norm_key(key).split("_")
    if any(word in key_words or norm_key(key).endswith(word) for word in _PATH_KEY_WORDS):
        return True
    return _PATH_VALUE_RE.search(value) is not None


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.extend(_flatten(value, name))
        elif isinstance(value, Mapping):
            out.append((name, "(none)"))
        else:
            out.append((name, value))
    return out
