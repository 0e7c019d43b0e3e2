"""Login cost: the AMP handshake in memory (sans-IO) and over loopback, with and without
the password KDF.

**sans-IO** (no sockets, this process): one exchange is ``ClientHandshake.start`` →
``ServerHandshake.challenge`` → ``respond`` → ``confirm`` → ``grant`` (a real
:class:`SessionGrant` payload) → ``finish``. ``kdf_excluded``: the client holds a
:class:`ScalarSecret` (π derived once, before the clock), so the figure is the group
arithmetic, hashing and sealing of both sides; ``client_p50_ms`` and ``server_p50_ms``
split it.
``guard``: the server side is an instance's :class:`SessionGuard` (``hello`` /
``confirm``: pending-login bookkeeping, session keys, the sealed grant, the server
session), the client a ScalarSecret. ``kdf_included``: the client holds a fresh
:class:`PasswordSecret` per exchange against a verifier with the default Argon2id
costs (t=3, p=4, 64 MiB), so every exchange derives π once; a few samples only.

**loopback**: ``SessionManager.session`` of a fresh manager against the ``full`` (and
``update``) Counter of the security site (:mod:`measure_levels`) over one
:class:`RpcConnection`: two clear round trips (``auth_hello``, ``auth_confirm``), the
client's pass 3 in a worker thread (``asyncio.to_thread``, as the SDK does), the
session built. ``kdf_excluded``: the operator's cached π (``ScalarSecret``);
``kdf_test_costs``: the operator's password (t=1, p=1, 64 KiB, the test suite's costs);
``kdf_default``: ``bench-a2id``, whose verifier has the default costs. A login is two
round trips; ``clear_round_trip`` (``get_stats`` of the ``open`` Counter on its own
connection) is timed alongside as the transport floor.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from harness import percentile
from measure_levels import A2ID_USER, CELLS, SITE_NAME

from ubicore.client import Client
from ubicore.schema import Protection
from ubicore.security.amp import (
    Challenge,
    ClientHandshake,
    Grant,
    PasswordSecret,
    ScalarSecret,
    ServerHandshake,
    UserSecret,
    VerifierRecord,
    make_verifier,
    password_scalar,
)
from ubicore.security.guard import SessionGuard
from ubicore.schema import registered_schemas
from ubicore.security.amp import VerifierRecord
from ubicore.security.policy import Right, StaticPolicy
from ubicore.security.primitives import KdfParams
from ubicore.store import Store, udata_path
from ubicore.security.primitives import DEFAULT_KDF, Secret, random_key
from ubicore.security.session import SessionGrant, delivery_context, new_session_keys
from ubicore.sessions import Credentials, SessionManager
from ubicore.testing.schemas import COUNTER
from ubicore.testing.site import OPERATOR, TEST_KDF
from ubicore.transport.rpc import RpcConnection

TARGET_LOOPBACK_MS = 2.0
"""A login over loopback, KDF excluded, under 2 ms."""
USER, PASSWORD = "bench-user", "bench-password"
SCHEMA, CELL, INSTANCE_ID = "UBench::Login", "Bench-L", b"\x11" * 16
LOGIN_TIMEOUT_S = 10.0


def _ms(values_s: list[float]) -> dict[str, float]:
    s = sorted(values_s)
    return {"p50_ms": round(percentile(s, 0.5) * 1e3, 3), "p99_ms": round(percentile(s, 0.99) * 1e3, 3),
            "min_ms": round(s[0] * 1e3, 3), "max_ms": round(s[-1] * 1e3, 3), "samples": len(s)}


def _grant_payload(group: bool) -> bytes:
    sid, c2s, s2c = new_session_keys()
    keys = ((7, random_key()), (8, random_key())) if group else ()
    return bytes(SessionGrant(sid, c2s, s2c, 7, "full", 3600.0, USER, keys).encode())


# --- sans-IO -------------------------------------------------------------------------------------


def _exchange(secret: UserSecret, lookup: Callable[[str], VerifierRecord | None], server_secret: Secret,
              payload: bytes, context: bytes) -> tuple[float, float]:
    """One exchange; (client seconds, server seconds)."""
    clock = time.perf_counter
    t0 = clock()
    ch = ClientHandshake(USER, SITE_NAME, secret)
    hello = ch.start()
    t1 = clock()
    sh = ServerHandshake(SITE_NAME, lookup, server_secret, fake_params=TEST_KDF)
    challenge = sh.challenge(hello)
    t2 = clock()
    confirm = ch.respond(challenge)
    t3 = clock()
    sh.confirm(confirm)
    grant, _ = sh.grant(payload, context, 7)
    t4 = clock()
    got, _ = ch.finish(grant, context)
    t5 = clock()
    if got != payload:
        raise RuntimeError("the handshake delivered the wrong payload")
    return (t1 - t0) + (t3 - t2) + (t5 - t4), (t2 - t1) + (t4 - t3)


def _guard_exchange(guard: SessionGuard, secret: UserSecret) -> float:
    """One login against a SessionGuard; seconds for both sides."""
    clock = time.perf_counter
    t0 = clock()
    ch = ClientHandshake(USER, SITE_NAME, secret)
    hello = ch.start()
    r2 = guard.hello(b"peer", {"user": hello.user, "g1": hello.g1})
    confirm = ch.respond(Challenge(r2["g2"], r2["salt"], TEST_KDF))
    r4 = guard.confirm(b"peer", {"hs": r2["hs"], "h_c": confirm.h_c})
    payload, _ = ch.finish(Grant(r4["h_s"], r4["nonce"], r4["keys"], r4["version"]),
                           delivery_context(guard.schema, guard.cell, guard.instance_id))
    t1 = clock()
    if SessionGrant.decode(payload).user != USER:
        raise RuntimeError("the guard granted someone else")
    return t1 - t0


def sans_io(samples: int, kdf_samples: int) -> dict[str, Any]:
    server_secret = Secret(b"\x42" * 32)
    context = delivery_context(SCHEMA, CELL, INSTANCE_ID)
    payload = _grant_payload(group=True)

    # KDF excluded: π derived once (test costs), held as a ScalarSecret
    record = make_verifier(USER, SITE_NAME, PASSWORD, TEST_KDF)
    scalar = ScalarSecret(password_scalar(PASSWORD, USER, SITE_NAME, record.salt, TEST_KDF), record.salt, TEST_KDF)
    lookup = {USER: record}.get
    for _ in range(20):  # warm-up
        _exchange(scalar, lookup, server_secret, payload, context)
    client_s, server_s, total_s = [], [], []
    for _ in range(samples):
        c, s = _exchange(scalar, lookup, server_secret, payload, context)
        client_s.append(c)
        server_s.append(s)
        total_s.append(c + s)
    excluded = {**_ms(total_s), "client_p50_ms": _ms(client_s)["p50_ms"], "server_p50_ms": _ms(server_s)["p50_ms"]}

    # the instance's guard as the server (session keys, grant, server session)
    policy = StaticPolicy(SITE_NAME, {USER: (record, Right.UPDATE)}, fake_params=TEST_KDF, server_secret=server_secret)
    guard = SessionGuard(SCHEMA, CELL, INSTANCE_ID, Protection.FULL, policy)
    for _ in range(20):
        _guard_exchange(guard, scalar)
    guarded = _ms([_guard_exchange(guard, scalar) for _ in range(samples)])
    guarded["sessions_made"] = len(guard.sessions)

    # KDF included, default costs: a fresh PasswordSecret derives π in every exchange
    t0 = time.perf_counter()
    record_a2 = make_verifier(USER, SITE_NAME, PASSWORD, DEFAULT_KDF)
    registration_s = time.perf_counter() - t0
    lookup_a2 = {USER: record_a2}.get
    kdf_client, kdf_total = [], []
    for _ in range(kdf_samples):
        c, s = _exchange(PasswordSecret(PASSWORD), lookup_a2, server_secret, payload, context)
        kdf_client.append(c)
        kdf_total.append(c + s)
    included = {**_ms(kdf_total), "client_p50_ms": _ms(kdf_client)["p50_ms"],
                "kdf": {"t": DEFAULT_KDF.t, "p": DEFAULT_KDF.p, "m_kib": DEFAULT_KDF.m_kib},
                "registration_ms": round(registration_s * 1e3, 1)}
    return {"kdf_excluded": excluded, "guard_kdf_excluded": guarded, "kdf_included": included}


# --- loopback ------------------------------------------------------------------------------------


async def _logins(conn: RpcConnection, level: str, creds: Callable[[], Credentials], samples: int) -> list[float]:
    lat = []
    clock = time.perf_counter
    for _ in range(samples):
        sm = SessionManager(creds(), site=SITE_NAME)
        t0 = clock()
        s = await sm.session(conn, COUNTER, CELLS[level], LOGIN_TIMEOUT_S)
        t1 = clock()
        if s.level != level:
            raise RuntimeError(f"logged in at {s.level}, not {level}")
        lat.append(t1 - t0)
    return lat


async def _clear_calls(conn: RpcConnection, samples: int) -> list[float]:
    lat = []
    clock = time.perf_counter
    for _ in range(samples):
        t0 = clock()
        await conn.call(COUNTER, CELLS["open"], "get_stats", {}, LOGIN_TIMEOUT_S)
        lat.append(clock() - t0)
    return lat


def _verifier_on_disk(dataset: Any, user: str) -> VerifierRecord:
    """A user's verifier record as the site's UPerm::Config holds it (read-only)."""
    importlib.import_module("ubicore.services.perm")  # declares UPerm::Config
    schema = registered_schemas()["UPerm::Config"]
    store = Store(schema, udata_path(dataset, "Site", "UPerm::Config"))
    try:
        row = store.tables["users"].get((user,))
    finally:
        store.close()
    if row is None:
        raise RuntimeError(f"{user} is missing from the site's policy")
    return VerifierRecord(user, row.salt, KdfParams(row.kdf_t, row.kdf_p, row.kdf_m_kib), row.verifier)


async def loopback(client: Client, dataset: Any, samples: int, kdf_samples: int) -> dict[str, Any]:
    record = _verifier_on_disk(dataset, OPERATOR[0])
    pi = password_scalar(OPERATOR[1], OPERATOR[0], SITE_NAME, record.salt, record.params)
    cached = Credentials(OPERATOR[0], ScalarSecret(pi, record.salt, record.params))
    out: dict[str, Any] = {}
    conn = RpcConnection((await client.find(CELLS["open"], COUNTER)).rpc)
    try:
        await _clear_calls(conn, 20)
        out["clear_round_trip"] = _ms(await _clear_calls(conn, samples))
    finally:
        conn.close()
    for level in ("full", "update"):
        conn = RpcConnection((await client.find(CELLS[level], COUNTER)).rpc)
        try:
            await _logins(conn, level, lambda: cached, 20)  # warm-up (also the worker thread)
            entry: dict[str, Any] = {
                "kdf_excluded": _ms(await _logins(conn, level, lambda: cached, samples)),
                "kdf_test_costs": _ms(await _logins(conn, level, lambda: Credentials.password(*OPERATOR), samples)),
            }
            if level == "full":
                entry["kdf_default"] = _ms(await _logins(conn, level, lambda: Credentials.password(*A2ID_USER),
                                                         kdf_samples))
                entry["kdf_default"]["kdf"] = {"t": DEFAULT_KDF.t, "p": DEFAULT_KDF.p, "m_kib": DEFAULT_KDF.m_kib}
            out[level] = entry
        finally:
            conn.close()
    p50 = out["full"]["kdf_excluded"]["p50_ms"]
    out["target"] = f"full kdf_excluded p50 < {TARGET_LOOPBACK_MS} ms"
    out["met"] = p50 < TARGET_LOOPBACK_MS
    return out


async def bench_handshake(client: Client | None, dataset: Any, samples: int, kdf_samples: int,
                          loopback_samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {"sans_io": sans_io(samples, kdf_samples)}
    if client is not None:
        out["loopback"] = await loopback(client, dataset, loopback_samples, kdf_samples)
    return out
