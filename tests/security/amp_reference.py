"""Reference material for the AMP handshake tests (test_amp_*.py, test_attacks_access.py) and
for tests/vectors/make_amp_vectors.py. Not a test module: nothing here is collected.

Two things here are not the module under test and keep the tests honest:

- ``spec_*``: the profile written out again from amp.md with integers, hashlib, hmac and
  ``cryptography``'s AES-GCM, using the primitives module only to encode points. The frozen
  vectors are made by it and the handshake objects are checked against it.
- ``NaiveServer``: AMP with β = [y]G1, the variant amp.md warns about. The stolen-verifier
  attack (``attacker_candidates``, ``attack``) must beat it and must not beat
  ``ServerHandshake``.

Besides: ``run`` drives one exchange through the real handshake objects with a man in the
middle (its ``on_*`` hooks) and checks that a side that failed refuses to go on;
``Scripted`` is an rng that hands out fixed bytes; ``make_records`` and ``load_vectors`` back
the ``records`` and ``vectors`` fixtures of the test modules.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ubicore.errors import AuthenticationFailed
from ubicore.security import amp
from ubicore.security import primitives as P
from ubicore.security.amp import (
    SUITE,
    Challenge,
    ClientHandshake,
    Confirm,
    Grant,
    Hello,
    PasswordSecret,
    ServerHandshake,
    VerifierRecord,
    make_verifier,
    password_scalar,
)
from ubicore.security.primitives import KdfParams, Secret

L = P.L
KDF = KdfParams(t=1, p=1, m_kib=64)
SITE = "test-site"
SERVER_SECRET = Secret(b"\x5a" * 32)
CONTEXT = b"schema:demo"
VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "amp_v1.json"


# --- the profile, written out again (reference for vectors and attacks) -------------------------


def _int(b: bytes) -> int:
    return int.from_bytes(b, "little")


def _sc(n: int) -> bytes:
    return (n % L).to_bytes(32, "little")


def _base(n: int) -> bytes:
    return P.base_mul(_sc(n))


def _h2s(label: str, t: bytes) -> int:
    return _int(hashlib.sha512(P.lp("AMP-v1", label, t)).digest()) % L


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = _hmac(prk, block + info + bytes([i]))
        out += block
        i += 1
    return out[:length]


def spec_params(params: KdfParams) -> bytes:
    return P.lp("argon2id", str(params.t), str(params.p), str(params.m_kib))


def spec_tt1(user: str, site: str, salt: bytes, params: KdfParams, g1: bytes) -> bytes:
    return P.lp(SUITE, user, site, salt, spec_params(params), g1)


def spec_keys(shared: bytes, tt: bytes, site: str) -> dict[str, bytes]:
    th = hashlib.sha256(tt).digest()
    prk = _hmac(th, shared)
    okm = _hkdf_expand(prk, b"AMP-v1 keys" + P.lp(SUITE, site), 64)
    return {"TH": th, "PRK": prk, "K_cC": okm[:16], "K_cS": okm[16:32], "K_wrap": okm[32:48], "K_sess": okm[48:]}


def spec_h_c(keys: dict[str, bytes]) -> bytes:
    return _hmac(keys["K_cC"], b"AMP client confirm" + keys["TH"])


def spec_h_s(keys: dict[str, bytes]) -> bytes:
    return _hmac(keys["K_cS"], b"AMP server confirm" + keys["TH"])


def spec_ad(keys: dict[str, bytes], context: bytes, version: int) -> bytes:
    return P.lp("AMP-v1 keydelivery", keys["TH"], context, version.to_bytes(8, "big"))


def spec_pi(password: str, user: str, site: str, salt: bytes, params: KdfParams) -> tuple[bytes, int]:
    kdf = Argon2id(
        salt=salt, length=64, iterations=params.t, lanes=params.p, memory_cost=params.m_kib,
        ad=P.lp(SUITE, user, site),
    )
    w = kdf.derive(password.encode("utf-8"))
    return w, _int(w) % L


def spec_exchange(inp: dict[str, Any]) -> dict[str, bytes]:
    """Every intermediate of one exchange, from the inputs, by the profile's algebra in
    closed form (points as [n]B of an integer n computed here)."""
    user, site, salt, params = inp["user"], inp["site"], inp["salt"], inp["params"]
    w, pi = spec_pi(inp["password"], user, site, salt, params)
    x, y = _int(inp["x_wide"]) % L, _int(inp["y_wide"]) % L
    g1 = _base(x)
    tt1 = spec_tt1(user, site, salt, params, g1)
    e1 = _h2s("e1", tt1)
    g2 = _base(y * (e1 * x + pi))
    tt = P.lp(tt1, g2)
    e2 = _h2s("e2", tt)
    d = (x * e1 + pi) % L
    omega = pow(d, -1, L) * (x + e2) % L
    alpha = _base(y * (x + e2))
    keys = spec_keys(alpha, tt, site)
    ad = spec_ad(keys, inp["context"], inp["version"])
    wrapped = AESGCM(keys["K_wrap"]).encrypt(inp["nonce"], inp["payload"], ad)
    return {
        "w": w, "pi": _sc(pi), "V": _base(pi), "x": _sc(x), "G1": g1, "TT1": tt1, "e1": _sc(e1),
        "y": _sc(y), "G2": g2, "TT": tt, "e2": _sc(e2), "d": _sc(d), "omega": _sc(omega),
        "alpha": alpha, **keys, "H_C": spec_h_c(keys), "H_S": spec_h_s(keys), "AD": ad,
        "nonce": inp["nonce"], "wrapped": wrapped,
    }


def spec_fake_record(server_secret: bytes, user: str) -> dict[str, bytes]:
    prk = _hmac(bytes(32), server_secret)  # HKDF-Extract with an empty salt
    okm = _hkdf_expand(prk, P.lp("ubicore fake verifier", user), 16 + 64)
    return {"salt": okm[:16], "V": _base(_int(okm[16:]) % L)}


class Scripted:
    """An rng that hands out the given chunks in order and checks the lengths asked for."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def __call__(self, n: int) -> bytes:
        assert self.chunks, "rng asked for more than the script holds"
        chunk = self.chunks.pop(0)
        assert len(chunk) == n, f"rng asked for {n} bytes, script has {len(chunk)}"
        return chunk


def replay_with_objects(inp: dict[str, Any]) -> dict[str, Any]:
    """One exchange through the real handshake objects with the inputs' randomness."""
    params = inp["params"]
    record = make_verifier(inp["user"], inp["site"], inp["password"], params, rng=Scripted(inp["salt"]))
    client = ClientHandshake(
        inp["user"], inp["site"], PasswordSecret(inp["password"]), rng=Scripted(inp["x_wide"])
    )
    server = ServerHandshake(
        inp["site"], {inp["user"]: record}.get, SERVER_SECRET, fake_params=params,
        rng=Scripted(inp["y_wide"], inp["nonce"]),
    )
    hello = client.start()
    challenge = server.challenge(hello)
    confirm = client.respond(challenge)
    server.confirm(confirm)
    grant, server_session = server.grant(inp["payload"], inp["context"], inp["version"])
    payload, client_session = client.finish(grant, inp["context"])
    pi = password_scalar(inp["password"], inp["user"], inp["site"], record.salt, params)
    return {
        "record": record, "pi": pi.value, "hello": hello, "challenge": challenge, "confirm": confirm,
        "grant": grant, "payload": payload, "K_sess_client": client_session.value,
        "K_sess_server": server_session.value,
    }


def vector_inputs_from_json(j: dict[str, Any]) -> dict[str, Any]:
    return {
        "user": j["user"], "site": j["site"], "password": j["password"],
        "salt": bytes.fromhex(j["salt"]), "params": KdfParams(**j["params"]),
        "x_wide": bytes.fromhex(j["x_wide"]), "y_wide": bytes.fromhex(j["y_wide"]),
        "nonce": bytes.fromhex(j["nonce"]), "payload": bytes.fromhex(j["payload"]),
        "context": bytes.fromhex(j["context"]), "version": j["version"],
    }


# --- running exchanges ----------------------------------------------------------------------------


def _same(m: Any) -> Any:
    return m


@dataclasses.dataclass
class Outcome:
    failed_at: str | None = None
    hello: Hello | None = None
    challenge: Challenge | None = None
    confirm: Confirm | None = None
    grant: Grant | None = None
    payload: bytes | None = None
    client_session: Secret | None = None
    server_session: Secret | None = None

    @property
    def ok(self) -> bool:
        return self.failed_at is None


def run(
    records: dict[str, VerifierRecord],
    user: str,
    secret: amp.UserSecret,
    *,
    client_site: str = SITE,
    server_site: str = SITE,
    client_rng: Callable[[int], bytes] = os.urandom,
    server_rng: Callable[[int], bytes] = os.urandom,
    on_hello: Callable[[Hello], Hello] = _same,
    on_challenge: Callable[[Challenge], Challenge] = _same,
    on_confirm: Callable[[Confirm], Confirm] = _same,
    on_grant: Callable[[Grant], Grant] = _same,
    payload: bytes = b"the data keys",
    context: bytes = CONTEXT,
    client_context: bytes | None = None,
    version: int = 1,
    server_secret: Secret = SERVER_SECRET,
) -> Outcome:
    """One exchange with a man in the middle (the ``on_*`` hooks). Only AuthenticationFailed
    may end it early; the side that failed must then refuse to go on."""
    client = ClientHandshake(user, client_site, secret, rng=client_rng)
    server = ServerHandshake(server_site, records.get, server_secret, fake_params=KDF, rng=server_rng)
    out = Outcome()
    stage = "start"
    try:
        out.hello = client.start()
        stage = "challenge"
        out.challenge = server.challenge(on_hello(out.hello))
        stage = "respond"
        out.confirm = client.respond(on_challenge(out.challenge))
        stage = "confirm"
        server.confirm(on_confirm(out.confirm))
        stage = "grant"
        out.grant, out.server_session = server.grant(payload, context, version)
        stage = "finish"
        out.payload, out.client_session = client.finish(
            on_grant(out.grant), context if client_context is None else client_context
        )
    except AuthenticationFailed:
        out.failed_at = stage
        if stage in ("challenge", "confirm"):  # no pass 4, ever, after a server-side failure
            with pytest.raises(RuntimeError):
                server.grant(payload, context, version)
            with pytest.raises(AuthenticationFailed):
                server.confirm(Confirm(b"\x00" * 32))
            assert server.state == "failed"
        if stage in ("respond", "finish"):
            with pytest.raises(RuntimeError):
                client.finish(Grant(b"", b"", b"", 0), context)
        return out
    assert out.payload == payload
    assert out.client_session is not None and out.server_session is not None
    assert out.client_session.equals(out.server_session)
    return out


def flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def pi_of(record: VerifierRecord, password: str, site: str = SITE) -> Secret:
    return password_scalar(password, record.user, site, record.salt, record.params)


PASSWORDS = {"alice": "correct horse battery staple", "bob": "hunter2", "émile": "pâté ✓", "eve": ""}


def make_records() -> dict[str, VerifierRecord]:
    """A verifier record for every user of PASSWORDS (each test module's ``records`` fixture)."""
    return {u: make_verifier(u, SITE, pw, KDF) for u, pw in PASSWORDS.items()}


def load_vectors() -> dict[str, Any]:
    """The frozen vectors, tests/vectors/amp_v1.json (each test module's ``vectors`` fixture)."""
    return json.loads(VECTORS.read_text())


# --- the stolen-verifier attack, and the naive variant it beats ------------------------------------


class NaiveServer:
    """AMP with β = [y]G1 (no e2 term), from primitives only: the variant that falls."""

    def __init__(self, site: str, record: VerifierRecord) -> None:
        self.site, self.record = site, record

    def challenge(self, hello: Hello) -> Challenge:
        rec = self.record
        self.g1 = P.check_point(hello.g1)
        self.tt1 = spec_tt1(hello.user, self.site, rec.salt, rec.params, self.g1)
        e1 = P.hash_to_scalar("e1", self.tt1)
        self.y = P.random_scalar()
        self.g2 = P.point_mul(self.y, P.point_add(P.point_mul(e1, self.g1), rec.verifier))
        return Challenge(self.g2, rec.salt, rec.params)

    def confirm(self, confirm: Confirm) -> None:
        keys = spec_keys(P.point_mul(self.y, self.g1), P.lp(self.tt1, self.g2), self.site)
        if not P.ct_equal(confirm.h_c, spec_h_c(keys)):
            raise AuthenticationFailed("authentication failed")


def naive_client_confirm(user: str, x: int, pi: int, ch: Challenge) -> bytes:
    """The honest client of the naive variant: α = [x/(x·e1 + π)]G2 = [y x]B."""
    g1 = _base(x)
    tt1 = spec_tt1(user, SITE, ch.salt, ch.params, g1)
    e1 = _h2s("e1", tt1)
    alpha = P.point_mul(_sc(x * pow(x * e1 + pi, -1, L)), ch.g2)
    return spec_h_c(spec_keys(alpha, P.lp(tt1, ch.g2), SITE))


def attacker_candidates(a: int, b: int, v: bytes, g1: bytes, ch: Challenge, user: str,
                        site: str = SITE) -> dict[str, bytes]:
    """What a thief holding (V, salt, params) can compute for α after sending G1 = [a]V + [b]B.

    G2 = [y]([e1]G1 + V) = [y(e1·a + 1)]V + [y·e1·b]B. With b = 0, [y]G1 = [y·a]V =
    [a/(e1·a + 1)]G2: exactly the naive server's β. The real β = [y]G1 + [y·e2]B also needs
    [y]B, which the thief cannot separate from G2.
    """
    tt1 = spec_tt1(user, site, ch.salt, ch.params, g1)
    e1, e2 = _h2s("e1", tt1), _h2s("e2", P.lp(tt1, ch.g2))
    k = a * pow(e1 * a + 1, -1, L) % L
    known = P.point_mul(_sc(k), ch.g2)
    return {
        "naive-win": known,
        "g2": ch.g2,
        "plus-e2B": P.point_add(known, _base(e2)),
        "plus-e2G1": P.point_add(known, P.point_mul(_sc(e2), g1)),
        "plus-e2V": P.point_add(known, P.point_mul(_sc(e2), v)),
        "times-1+e2": P.point_mul(_sc(k * (1 + e2)), ch.g2),
    }


def attack(server: Any, rec: VerifierRecord, a: int, b: int, which: str) -> bool:
    """One attempt; True if the server accepted the thief's H_C."""
    g1 = P.point_mul(_sc(a), rec.verifier)
    if b:
        g1 = P.point_add(g1, _base(b))
    ch = server.challenge(Hello(rec.user, g1))  # a valid element: the key schedule is what must stop it
    alpha = attacker_candidates(a, b, rec.verifier, g1, ch, rec.user)[which]
    tt = P.lp(spec_tt1(rec.user, SITE, ch.salt, ch.params, g1), ch.g2)
    try:
        server.confirm(Confirm(spec_h_c(spec_keys(alpha, tt, SITE))))
    except AuthenticationFailed:
        return False
    return True
