"""Join (dump) time of a 100,000-row relation, against one raw msgpack reply.

Ours: the ``UBench::Table`` instance is filled with the rows of :func:`rows.table_row`;
then the time for ``Client.cache(...)`` to return ready (subscribe, ``get_group``,
``get_dump``, building the local tables). Also reported: one ``Client.call`` of
``get_dump`` alone (wire and server share of the join).
Raw: a DEALER asks a child ROUTER that answers with one msgpack body holding the same
rows; the clock stops when the client has unpacked it.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import msgpack
import zmq

from harness import MEASURE_TIMEOUT_S, Child, log, median, paired_ratio
from ubicore.client import Client

TABLE = "UBench::Table"
TABLE_CELL = "Bench-B"
FILL_CHUNK = 20_000
TARGET_S = 1.0


async def fill(client: Client, rows: int) -> None:
    for start in range(0, rows, FILL_CHUNK):
        await client.call(TABLE_CELL, TABLE, "fill", start=start, count=min(FILL_CHUNK, rows - start),
                          timeout_s=MEASURE_TIMEOUT_S)


async def ours_join(client: Client, rows: int) -> dict[str, float]:
    gc.collect()
    t0 = time.perf_counter()
    cache = await client.cache(TABLE_CELL, TABLE, timeout_s=MEASURE_TIMEOUT_S)
    t1 = time.perf_counter()
    try:
        got = len(cache.table("items"))
        if got != rows:
            raise RuntimeError(f"joined {got} rows, expected {rows}")
    finally:
        await cache.close()
    gc.collect()
    t2 = time.perf_counter()
    await client.call(TABLE_CELL, TABLE, "get_dump", timeout_s=MEASURE_TIMEOUT_S)
    t3 = time.perf_counter()
    return {"join_s": t1 - t0, "get_dump_call_s": t3 - t2}


def raw_join(endpoint: str, rows: int) -> float:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(MEASURE_TIMEOUT_S * 1000))
        sock.connect(endpoint)
        gc.collect()
        t0 = time.perf_counter()
        sock.send(b"dump")
        body = sock.recv(copy=False)
        data = msgpack.unpackb(body.buffer, raw=False)
        t1 = time.perf_counter()
        if len(data) != rows:
            raise RuntimeError(f"raw dump held {len(data)} rows, expected {rows}")
        return t1 - t0
    finally:
        sock.close(0)
        ctx.term()


async def bench_join(client: Client, rows: int, reps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    await fill(client, rows)
    log(f"[join] filled {rows:,} rows in {time.perf_counter() - t0:.2f} s")
    child = Child("raw_child.py", "dump", str(rows))
    try:
        ours_runs, raw_runs, dump_calls = [], [], []
        for rep in range(reps):
            o = await ours_join(client, rows)
            r = raw_join(child.info["rpc"], rows)
            ours_runs.append(o["join_s"])
            dump_calls.append(o["get_dump_call_s"])
            raw_runs.append(r)
            log(f"[join] rep {rep + 1}/{reps}: ubicore {o['join_s'] * 1000:.0f} ms "
                f"(get_dump call alone {o['get_dump_call_s'] * 1000:.0f} ms), raw {r * 1000:.0f} ms")
    finally:
        child.close()
    ours_s, raw_s = median(ours_runs), median(raw_runs)
    return {
        "rows": rows,
        "ubicore_s": round(ours_s, 4),
        "raw_s": round(raw_s, 4),
        "ratio": paired_ratio(ours_runs, raw_runs)[0],
        "ubicore_get_dump_call_s": round(median(dump_calls), 4),
        "target": f"ubicore_s < {TARGET_S}",
        "met": ours_s < TARGET_S,
        "ubicore_runs_s": [round(x, 4) for x in ours_runs],
        "raw_runs_s": [round(x, 4) for x in raw_runs],
    }
