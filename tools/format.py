"""Turning results, rows and changes into text a person can read, or JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def plain(value: Any) -> Any:
    """A JSON-ready copy: bytes become hex strings, tuples lists, named tuples maps."""
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def to_json(value: Any) -> str:
    return json.dumps(plain(value), sort_keys=True)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"})


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``): a user name or
    detail a client chose never moves the cursor or forges a line on a terminal."""
    return text.translate(_CONTROL)


def cell_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex()[:12] + ("…" if len(value) > 6 else "")
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "-"
    return printable(str(value))


def when(t: float) -> str:
    """A unix time as the tools show it: local ISO date and time to the second."""
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A left-aligned text table with a header line."""
    body = [[cell_text(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


def result_text(result: Any) -> str:
    """An operation's result: ``ok`` for none, lines for maps and lists."""
    if result is None:
        return "ok"
    if isinstance(result, Mapping):
        width = max((len(str(k)) for k in result), default=0)
        return "\n".join(f"{str(k).ljust(width)}  {cell_text(v)}" for k, v in result.items())
    if isinstance(result, (list, tuple)):
        return "\n".join(cell_text(v) if not isinstance(v, (Mapping, list, tuple)) else to_json(v) for v in result)
    return cell_text(result)


def row_text(row: Any) -> str:
    return " ".join(f"{k}={cell_text(v)}" for k, v in row._asdict().items())


def change_text(relation: str, old: Any, new: Any, key_index: Sequence[int] = ()) -> str:
    """One change as a line: ``+`` insert, ``~`` update (the key, then what changed), ``-`` delete."""
    if old is None:
        return f"+ {relation} {row_text(new)}"
    if new is None:
        return f"- {relation} {row_text(old)}"
    o, n = old._asdict(), new._asdict()
    changed = [f"{k} {cell_text(o[k])} → {cell_text(v)}" for k, v in n.items() if o[k] != v]
    key = " ".join(cell_text(new[i]) for i in key_index)
    return f"~ {relation} [{key}] " + ", ".join(changed)
