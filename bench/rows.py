"""The rows the benchmarks move, built the same way by ubicore and raw-pyzmq children.

Pure Python: the raw children import this without importing ubicore.
"""

from __future__ import annotations

TABLE_COLUMNS = ("k", "name", "x", "y", "payload")
TABLE_PAYLOAD_BYTES = 32
STREAM_KEYS = 1024
"""Stream rows cycle over this many keys: the first pass inserts, later ones update."""


def table_row(i: int, payload_size: int = TABLE_PAYLOAD_BYTES) -> tuple[int, str, float, float, bytes]:
    """Row ``i`` of the join benchmark's relation (k, name, x, y, payload)."""
    return (i, f"item-{i:06d}", i * 0.5, i * 0.25, (i % 251).to_bytes(1, "little") * payload_size)


def stream_payload(counter: int, size: int, filler: bytes) -> bytes:
    """A ``size``-byte payload that differs for every counter value (so every upsert
    of an existing key is a real change)."""
    return counter.to_bytes(8, "little") + filler[: max(0, size - 8)]
