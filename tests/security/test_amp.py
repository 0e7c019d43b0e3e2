"""The AMP-style key exchange (ubicore/security/amp.py) against the nine test groups of
shared/design/amp.md, "Tests any correct implementation passes", plus the handshake's
own rules (redaction, one-shot state, cached credentials).

Two things here are not the module under test and keep the tests honest:

- ``spec_*``: the profile written out again from amp.md with integers, hashlib, hmac and
  ``cryptography``'s AES-GCM, using the primitives module only to encode points. The frozen
  vectors are made by it and the handshake objects are checked against it.
- ``NaiveServer``: AMP with β = [y]G1, the variant amp.md warns about. The stolen-verifier
  attack must beat it and must not beat ``ServerHandshake``.
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

from ubicore.errors import AuthenticationFailed, UbiError
from ubicore.security import amp
from ubicore.security import primitives as P
from ubicore.security.amp import (
    SUITE,
    Challenge,
    ClientHandshake,
    Confirm,
    CredentialsOutOfDate,
    Grant,
    Hello,
    PasswordSecret,
    ScalarSecret,
    ServerHandshake,
    VerifierRecord,
    fake_record,
    make_verifier,
    password_scalar,
)
from ubicore.security.primitives import DegenerateScalar, KdfParams, Secret

from .test_primitives import BAD_ELEMENTS

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


@pytest.fixture(scope="module")
def records() -> dict[str, VerifierRecord]:
    return {u: make_verifier(u, SITE, pw, KDF) for u, pw in PASSWORDS.items()}


# --- 1. agreement --------------------------------------------------------------------------------


def test_agreement_over_many_runs(records: dict[str, VerifierRecord]) -> None:
    users = list(PASSWORDS)
    sessions = set()
    for i in range(50):
        user = users[i % len(users)]
        secret: amp.UserSecret = (
            PasswordSecret(PASSWORDS[user]) if i % 2 else ScalarSecret(pi_of(records[user], PASSWORDS[user]),
                                                                          records[user].salt, KDF)
        )
        payload = os.urandom(i)  # including the empty payload
        out = run(records, user, secret, payload=payload, version=i)
        assert out.ok, out.failed_at
        assert out.payload == payload
        assert out.client_session is not None and len(out.client_session) == 16
        sessions.add(out.client_session.value)
    assert len(sessions) == 50


def test_agreement_matches_the_profile(records: dict[str, VerifierRecord]) -> None:
    """The reference client (spec_*) is accepted by the real server: the key schedule the
    attacks below use is the real one."""
    rec = records["alice"]
    pi = _int(pi_of(rec, PASSWORDS["alice"]).value)
    for _ in range(5):
        x = _int(P.random_scalar())
        server = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
        g1 = _base(x)
        ch = server.challenge(Hello("alice", g1))
        tt1 = spec_tt1("alice", SITE, ch.salt, ch.params, g1)
        tt = P.lp(tt1, ch.g2)
        e1, e2 = _h2s("e1", tt1), _h2s("e2", tt)
        alpha = P.point_mul(_sc(pow(x * e1 + pi, -1, L) * (x + e2)), ch.g2)
        keys = spec_keys(alpha, tt, SITE)
        server.confirm(Confirm(spec_h_c(keys)))
        grant, k_sess = server.grant(b"keys", CONTEXT, 3)
        assert grant.h_s == spec_h_s(keys)
        assert k_sess.value == keys["K_sess"]
        assert AESGCM(keys["K_wrap"]).decrypt(grant.nonce, grant.wrapped, spec_ad(keys, CONTEXT, 3)) == b"keys"


# --- 2. wrong password ------------------------------------------------------------------------------


def test_wrong_password_is_refused_and_nothing_keyed_precedes_confirm(records: dict[str, VerifierRecord]) -> None:
    rec = records["alice"]
    x_wide, y_wide = os.urandom(64), os.urandom(64)
    outcomes = {}
    for pw in (PASSWORDS["alice"], "Correct horse battery staple", "", "hunter2", PASSWORDS["alice"] + " "):
        outcomes[pw] = run(records, "alice", PasswordSecret(pw), client_rng=Scripted(x_wide),
                           server_rng=Scripted(y_wide, os.urandom(12)))
    right = outcomes.pop(PASSWORDS["alice"])
    assert right.ok
    # What the server sent before confirm is a function of (y, G1, record) alone.
    x, y = _int(x_wide) % L, _int(y_wide) % L
    e1 = _h2s("e1", spec_tt1("alice", SITE, rec.salt, KDF, _base(x)))
    expected_g2 = P.point_mul(_sc(y), P.point_add(P.point_mul(_sc(e1), _base(x)), rec.verifier))
    assert [f.name for f in dataclasses.fields(Challenge)] == ["g2", "salt", "params"]
    assert right.challenge == Challenge(expected_g2, rec.salt, KDF)
    for out in outcomes.values():
        assert out.failed_at == "confirm"  # and run() checked: grant impossible, state wiped
        assert out.hello == right.hello
        assert out.challenge == right.challenge
        assert out.grant is None
        assert out.confirm is not None and out.confirm.h_c != right.confirm.h_c  # type: ignore[union-attr]


def test_wrong_password_grant_impossible() -> None:
    rec = make_verifier("alice", SITE, "right", KDF)
    client = ClientHandshake("alice", SITE, PasswordSecret("wrong"))
    server = ServerHandshake(SITE, {"alice": rec}.get, SERVER_SECRET, fake_params=KDF)
    confirm = client.respond(server.challenge(client.start()))
    with pytest.raises(AuthenticationFailed):
        server.confirm(confirm)
    with pytest.raises(RuntimeError):
        server.grant(b"keys", CONTEXT, 1)
    # the exchange is over: even the right answer is refused now
    with pytest.raises(AuthenticationFailed):
        server.confirm(confirm)
    with pytest.raises(RuntimeError):
        server.grant(b"keys", CONTEXT, 1)


# --- 3. freshness and replay -------------------------------------------------------------------------


def test_freshness(records: dict[str, VerifierRecord]) -> None:
    outs = [run(records, "bob", PasswordSecret(PASSWORDS["bob"])) for _ in range(20)]
    assert all(o.ok for o in outs)
    for pick in (
        lambda o: o.hello.g1, lambda o: o.challenge.g2, lambda o: o.confirm.h_c, lambda o: o.grant.h_s,
        lambda o: o.grant.nonce, lambda o: o.grant.wrapped, lambda o: o.client_session.value,
    ):
        assert len({pick(o) for o in outs}) == len(outs)


def test_confirm_replayed_into_another_exchange_fails(records: dict[str, VerifierRecord]) -> None:
    secret = PasswordSecret(PASSWORDS["bob"])
    ca, cb = ClientHandshake("bob", SITE, secret), ClientHandshake("bob", SITE, secret)
    sa = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    sb = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    conf_a = ca.respond(sa.challenge(ca.start()))
    cb.respond(sb.challenge(cb.start()))
    with pytest.raises(AuthenticationFailed):
        sb.confirm(conf_a)
    with pytest.raises(RuntimeError):
        sb.grant(b"keys", CONTEXT, 1)
    sa.confirm(conf_a)  # it was good where it belonged
    # and a confirm replayed into the same (finished) exchange is refused
    sa.grant(b"keys", CONTEXT, 1)
    with pytest.raises(AuthenticationFailed):
        sa.confirm(conf_a)


def test_grant_replayed_into_another_exchange_fails(records: dict[str, VerifierRecord]) -> None:
    secret = PasswordSecret(PASSWORDS["bob"])
    ca, cb = ClientHandshake("bob", SITE, secret), ClientHandshake("bob", SITE, secret)
    sa = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    sb = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    sa.confirm(ca.respond(sa.challenge(ca.start())))
    sb.confirm(cb.respond(sb.challenge(cb.start())))
    grant_a, _ = sa.grant(b"keys", CONTEXT, 1)
    grant_b, _ = sb.grant(b"keys", CONTEXT, 1)
    with pytest.raises(AuthenticationFailed):
        cb.finish(grant_a, CONTEXT)
    with pytest.raises(RuntimeError):
        cb.finish(grant_b, CONTEXT)  # wiped: the right grant no longer helps
    assert ca.finish(grant_a, CONTEXT)[0] == b"keys"
    with pytest.raises(RuntimeError):
        ca.finish(grant_a, CONTEXT)  # nor twice


# --- 4. stolen verifier -------------------------------------------------------------------------------


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


def test_naive_variant_is_a_working_protocol() -> None:
    rec = make_verifier("alice", SITE, "secret", KDF)
    pi = _int(pi_of(rec, "secret").value)
    wrong = _int(pi_of(rec, "Secret").value)
    for _ in range(3):
        x = _int(P.random_scalar())
        server = NaiveServer(SITE, rec)
        server.confirm(Confirm(naive_client_confirm("alice", x, pi, server.challenge(Hello("alice", _base(x))))))
        server = NaiveServer(SITE, rec)
        with pytest.raises(AuthenticationFailed):
            server.confirm(Confirm(naive_client_confirm("alice", x, wrong, server.challenge(Hello("alice", _base(x))))))


def test_stolen_verifier_beats_naive_server_but_not_ours() -> None:
    rec = make_verifier("alice", SITE, "a long and unguessable password", KDF)
    lookup = {"alice": rec}.get
    strategies = [(_int(P.random_scalar()), 0) for _ in range(4)]
    strategies += [(_int(P.random_scalar()), _int(P.random_scalar())) for _ in range(4)]
    strategies += [(1, 0), (L - 1, 0), (1, 1)]
    candidates = ["naive-win", "g2", "plus-e2B", "plus-e2G1", "plus-e2V", "times-1+e2"]
    naive_wins = 0
    for a, b in strategies:
        for which in candidates:
            real = ServerHandshake(SITE, lookup, SERVER_SECRET, fake_params=KDF)
            assert not attack(real, rec, a, b, which), (a, b, which)
            with pytest.raises(RuntimeError):
                real.grant(b"keys", CONTEXT, 1)
            won = attack(NaiveServer(SITE, rec), rec, a, b, which)
            assert won == (b == 0 and which == "naive-win"), (a, b, which)
            naive_wins += won
    assert naive_wins == sum(1 for _, b in strategies if b == 0)


# --- 5. element rejection ------------------------------------------------------------------------------

BAD_IDS = [b[0] for b in BAD_ELEMENTS]


@pytest.mark.parametrize("label,element", BAD_ELEMENTS, ids=BAD_IDS)
@pytest.mark.parametrize("user", ["alice", "nobody"])
def test_bad_g1_refused(records: dict[str, VerifierRecord], user: str, label: str, element: object) -> None:
    server = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    with pytest.raises(AuthenticationFailed):
        server.challenge(Hello(user, element))  # type: ignore[arg-type]
    assert server.state == "failed"
    with pytest.raises(AuthenticationFailed):
        server.confirm(Confirm(b"\x00" * 32))
    with pytest.raises(RuntimeError):
        server.grant(b"keys", CONTEXT, 1)


@pytest.mark.parametrize("label,element", BAD_ELEMENTS, ids=BAD_IDS)
def test_bad_g2_refused(records: dict[str, VerifierRecord], label: str, element: object) -> None:
    rec = records["alice"]
    client = ClientHandshake("alice", SITE, ScalarSecret(pi_of(rec, PASSWORDS["alice"]), rec.salt, KDF))
    client.start()
    with pytest.raises(AuthenticationFailed):
        client.respond(Challenge(element, rec.salt, KDF))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        client.respond(Challenge(rec.verifier, rec.salt, KDF))
    with pytest.raises(RuntimeError):
        client.finish(Grant(b"", b"", b"", 1), CONTEXT)


@pytest.mark.parametrize(
    "salt,params",
    [
        (b"", KDF), (b"s" * 15, KDF), (b"s" * 17, KDF), (bytearray(16), KDF), (None, KDF), ("s" * 16, KDF),
        (b"s" * 16, KdfParams(0, 1, 64)), (b"s" * 16, KdfParams(1, 1, 4 * 1024 * 1024 + 1)),
        (b"s" * 16, KdfParams(1, 65, 1024)), (b"s" * 16, KdfParams("1", 1, 64)),  # type: ignore[arg-type]
        (b"s" * 16, None), (b"s" * 16, (1, 1, 64)),
    ],
)
def test_bad_challenge_fields_refused(salt: object, params: object) -> None:
    """A server (or a man in the middle) cannot make the client run Argon2 on junk or at
    any cost it likes, nor raise anything but AuthenticationFailed."""
    client = ClientHandshake("alice", SITE, PasswordSecret("pw"))
    client.start()
    with pytest.raises(AuthenticationFailed):
        client.respond(Challenge(P.base_mul(P.random_scalar()), salt, params))  # type: ignore[arg-type]


@pytest.mark.parametrize("user", ["", "x" * 257, None, 7, b"alice", "\ud800"])
def test_bad_user_names(user: object) -> None:
    server = ServerHandshake(SITE, {}.get, SERVER_SECRET, fake_params=KDF)
    with pytest.raises(AuthenticationFailed):
        server.challenge(Hello(user, P.base_mul(P.random_scalar())))  # type: ignore[arg-type]
    if isinstance(user, str) and user != "\ud800":
        with pytest.raises(ValueError):
            ClientHandshake(user, SITE, PasswordSecret("pw"))


# --- 6. binding ------------------------------------------------------------------------------------------


def _scalar_secret(rec: VerifierRecord, salt: bytes | None = None, params: KdfParams | None = None) -> ScalarSecret:
    """π that matches V, cached for whatever salt/params the test wants the client to see:
    a failure then comes from the transcript alone."""
    return ScalarSecret(pi_of(rec, PASSWORDS[rec.user]), salt or rec.salt, params or rec.params)


def test_binding_user(records: dict[str, VerifierRecord]) -> None:
    rec = records["alice"]
    aliased = {"alice": rec, "mallory": rec}  # the same record under another name
    assert run(aliased, "alice", _scalar_secret(rec)).ok
    out = run(aliased, "alice", _scalar_secret(rec), on_hello=lambda h: dataclasses.replace(h, user="mallory"))
    assert out.failed_at == "confirm"
    out = run(aliased, "mallory", _scalar_secret(rec), on_hello=lambda h: dataclasses.replace(h, user="alice"))
    assert out.failed_at == "confirm"


def test_binding_site(records: dict[str, VerifierRecord]) -> None:
    rec = records["alice"]
    assert run(records, "alice", _scalar_secret(rec)).ok
    assert run(records, "alice", _scalar_secret(rec), client_site="other-site").failed_at == "confirm"
    assert run(records, "alice", _scalar_secret(rec), server_site="other-site").failed_at == "confirm"
    # with the password, the site is also in the Argon2 associated data
    assert run(records, "alice", PasswordSecret(PASSWORDS["alice"]), client_site="other-site").failed_at == "confirm"


def test_binding_salt_and_params(records: dict[str, VerifierRecord]) -> None:
    rec = records["alice"]
    other_salt = bytes(16)
    other_params = KdfParams(t=2, p=1, m_kib=64)
    out = run(records, "alice", _scalar_secret(rec, salt=other_salt),
              on_challenge=lambda c: dataclasses.replace(c, salt=other_salt))
    assert out.failed_at == "confirm"
    out = run(records, "alice", _scalar_secret(rec, params=other_params),
              on_challenge=lambda c: dataclasses.replace(c, params=other_params))
    assert out.failed_at == "confirm"
    for change in ({"salt": other_salt}, {"params": other_params}):
        out = run(records, "alice", PasswordSecret(PASSWORDS["alice"]),
                  on_challenge=lambda c: dataclasses.replace(c, **change))
        assert out.failed_at == "confirm"


@pytest.mark.parametrize("side", ["client", "server"])
def test_binding_suite(records: dict[str, VerifierRecord], monkeypatch: pytest.MonkeyPatch, side: str) -> None:
    rec = records["alice"]
    client = ClientHandshake("alice", SITE, _scalar_secret(rec))
    server = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    hello = client.start()
    if side == "server":
        monkeypatch.setattr(amp, "SUITE", "AMP-E25519-SHA256-A2id-v2")
    challenge = server.challenge(hello)
    monkeypatch.undo()
    if side == "client":
        monkeypatch.setattr(amp, "SUITE", "AMP-E25519-SHA256-A2id-v2")
    confirm = client.respond(challenge)
    monkeypatch.undo()
    with pytest.raises(AuthenticationFailed):
        server.confirm(confirm)


def test_binding_grant_context_and_version(records: dict[str, VerifierRecord]) -> None:
    secret = PasswordSecret(PASSWORDS["bob"])
    assert run(records, "bob", secret, version=5).ok
    assert run(records, "bob", secret, client_context=b"schema:other").failed_at == "finish"
    assert run(records, "bob", secret, client_context=b"").failed_at == "finish"
    for v in (4, 6, 0, 2**63, -1, 2**64, "5", None):
        out = run(records, "bob", secret, version=5, on_grant=lambda g: dataclasses.replace(g, version=v))
        assert out.failed_at == "finish", v


def test_swapping_confirmations_fails(records: dict[str, VerifierRecord]) -> None:
    secret = PasswordSecret(PASSWORDS["bob"])
    x_wide, y_wide, nonce = os.urandom(64), os.urandom(64), os.urandom(12)

    def rngs() -> dict[str, Scripted]:
        return {"client_rng": Scripted(x_wide), "server_rng": Scripted(y_wide, nonce)}

    first = run(records, "bob", secret, **rngs())
    assert first.ok and first.grant is not None and first.confirm is not None
    h_c, h_s = first.confirm.h_c, first.grant.h_s
    assert h_c != h_s
    again = run(records, "bob", secret, **rngs())  # same randomness: same transcript, same keys
    assert again.ok and again.confirm == first.confirm and again.grant == first.grant
    out = run(records, "bob", secret, on_confirm=lambda c: Confirm(h_s), **rngs())
    assert out.failed_at == "confirm"  # H_S presented as H_C
    out = run(records, "bob", secret, on_grant=lambda g: dataclasses.replace(g, h_s=h_c), **rngs())
    assert out.failed_at == "finish"  # the client's own H_C reflected as H_S


def test_flipping_any_bit_of_any_pass_fails(records: dict[str, VerifierRecord]) -> None:
    rec = records["alice"]
    scalar = _scalar_secret(rec)
    password = PasswordSecret(PASSWORDS["alice"])
    payload = os.urandom(100)
    for bit in range(256):
        out = run(records, "alice", scalar, on_hello=lambda h: dataclasses.replace(h, g1=flip(h.g1, bit)))
        assert out.failed_at in ("challenge", "confirm"), ("g1", bit)
        out = run(records, "alice", scalar, on_challenge=lambda c: dataclasses.replace(c, g2=flip(c.g2, bit)))
        assert out.failed_at in ("respond", "confirm"), ("g2", bit)
        out = run(records, "alice", scalar, on_confirm=lambda c: Confirm(flip(c.h_c, bit)))
        assert out.failed_at == "confirm", ("h_c", bit)
        out = run(records, "alice", scalar, on_grant=lambda g: dataclasses.replace(g, h_s=flip(g.h_s, bit)))
        assert out.failed_at == "finish", ("h_s", bit)
    for bit in range(128):
        out = run(records, "alice", password, on_challenge=lambda c: dataclasses.replace(c, salt=flip(c.salt, bit)))
        assert out.failed_at == "confirm", ("salt", bit)
    for bit in range(96):
        out = run(records, "alice", scalar, on_grant=lambda g: dataclasses.replace(g, nonce=flip(g.nonce, bit)))
        assert out.failed_at == "finish", ("nonce", bit)
    wrapped_bits = (len(payload) + 16) * 8
    for bit in list(range(8)) + list(range(wrapped_bits - 8, wrapped_bits)) + [
        int.from_bytes(os.urandom(4), "big") % wrapped_bits for _ in range(64)
    ]:
        out = run(records, "alice", scalar, payload=payload,
                  on_grant=lambda g: dataclasses.replace(g, wrapped=flip(g.wrapped, bit)))
        assert out.failed_at == "finish", ("wrapped", bit)
    for cut in (lambda w: w[:-1], lambda w: w + b"\x00", lambda w: b"", lambda w: w[16:]):
        out = run(records, "alice", scalar, payload=payload,
                  on_grant=lambda g: dataclasses.replace(g, wrapped=cut(g.wrapped)))
        assert out.failed_at == "finish"
    for junk in (b"", b"\x00" * 11, b"\x00" * 13, None):
        out = run(records, "alice", scalar, on_grant=lambda g: dataclasses.replace(g, nonce=junk))
        assert out.failed_at == "finish"
    for junk in (b"", None, "text", b"\x00" * 32):
        out = run(records, "alice", scalar, on_confirm=lambda c: Confirm(junk))
        assert out.failed_at == "confirm"
        out = run(records, "alice", scalar, on_grant=lambda g: dataclasses.replace(g, h_s=junk))
        assert out.failed_at == "finish"


# --- 7. degenerate scalars -----------------------------------------------------------------------------

DEGENERATE_RANDOMNESS = {
    "zeros": bytes(64),
    "L": L.to_bytes(64, "little"),
    "5L": (5 * L).to_bytes(64, "little"),
    "short": b"\x07" * 8,
    "empty": b"",
}


class LoopGuard:
    """Returns the same bytes forever; a caller that re-draws in a loop trips it."""

    def __init__(self, value: bytes) -> None:
        self.value, self.calls = value, 0

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        if self.calls > 20:
            raise AssertionError("randomness drawn in a loop")
        return self.value


@pytest.mark.parametrize("name", list(DEGENERATE_RANDOMNESS))
def test_degenerate_client_randomness(name: str) -> None:
    client = ClientHandshake("alice", SITE, PasswordSecret("pw"), rng=LoopGuard(DEGENERATE_RANDOMNESS[name]))
    with pytest.raises((AuthenticationFailed, DegenerateScalar)) as info:
        client.start()
    assert isinstance(info.value, UbiError)
    with pytest.raises(RuntimeError):
        client.respond(Challenge(P.base_mul(P.random_scalar()), b"s" * 16, KDF))


@pytest.mark.parametrize("name", list(DEGENERATE_RANDOMNESS))
@pytest.mark.parametrize("user", ["alice", "nobody"])
def test_degenerate_server_randomness(records: dict[str, VerifierRecord], name: str, user: str) -> None:
    server = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF,
                             rng=LoopGuard(DEGENERATE_RANDOMNESS[name]))
    with pytest.raises((AuthenticationFailed, DegenerateScalar)) as info:
        server.challenge(Hello(user, P.base_mul(P.random_scalar())))
    assert isinstance(info.value, UbiError)
    with pytest.raises(RuntimeError):
        server.grant(b"keys", CONTEXT, 1)


def test_scalar_one_is_not_degenerate(records: dict[str, VerifierRecord]) -> None:
    one = (L + 1).to_bytes(64, "little")  # reduces to 1: x = y = 1 are legal
    out = run(records, "alice", PasswordSecret(PASSWORDS["alice"]), client_rng=Scripted(one),
              server_rng=Scripted(one, os.urandom(12)))
    assert out.ok and out.hello is not None and out.hello.g1 == _base(1)


def test_degenerate_d_aborts_cleanly(records: dict[str, VerifierRecord]) -> None:
    """π chosen (as a cached scalar) so that d = x·e1 + π = 0."""
    rec = records["alice"]
    x_wide = os.urandom(64)
    x = _int(x_wide) % L
    e1 = _h2s("e1", spec_tt1("alice", SITE, rec.salt, KDF, _base(x)))
    bad = ScalarSecret(Secret(_sc(-x * e1)), rec.salt, KDF)
    out = run(records, "alice", bad, client_rng=Scripted(x_wide))
    assert out.failed_at == "respond"


def test_identity_for_e1_g1_plus_v_aborts_cleanly() -> None:
    """A record whose V = -[e1]G1 makes [e1]G1 + V the identity: the server must refuse it."""
    salt, x = os.urandom(16), _int(P.random_scalar())
    e1 = _h2s("e1", spec_tt1("alice", SITE, salt, KDF, _base(x)))
    rec = VerifierRecord("alice", salt, KDF, _base(-x * e1))
    server = ServerHandshake(SITE, {"alice": rec}.get, SERVER_SECRET, fake_params=KDF)
    with pytest.raises(AuthenticationFailed):
        server.challenge(Hello("alice", _base(x)))
    with pytest.raises(RuntimeError):
        server.grant(b"keys", CONTEXT, 1)


def test_zero_password_scalar_aborts_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2id output ≡ 0 mod L (forced: only the reduction logic is under test)."""
    monkeypatch.setattr(P, "argon2id", lambda *a, **k: Secret((3 * L).to_bytes(64, "little")))
    with pytest.raises(DegenerateScalar):
        make_verifier("alice", SITE, "pw", KDF)
    client = ClientHandshake("alice", SITE, PasswordSecret("pw"))
    client.start()
    with pytest.raises(AuthenticationFailed):
        client.respond(Challenge(P.base_mul(P.random_scalar()), b"s" * 16, KDF))


# --- 8. enumeration -----------------------------------------------------------------------------------


def test_unknown_user_challenge_looks_real(records: dict[str, VerifierRecord]) -> None:
    def challenge(user: str, secret: Secret = SERVER_SECRET) -> Challenge:
        server = ServerHandshake(SITE, records.get, secret, fake_params=KDF)
        return server.challenge(Hello(user, P.base_mul(P.random_scalar())))

    real, ghost = challenge("alice"), challenge("ghost")
    for ch in (real, ghost):
        assert type(ch) is Challenge
        assert type(ch.g2) is bytes and len(ch.g2) == 32 and P.is_valid_point(ch.g2)
        assert type(ch.salt) is bytes and len(ch.salt) == amp.SALT_BYTES
        assert ch.params == KDF
    # stable per name, like a real record's
    again = challenge("ghost")
    assert (again.salt, again.params) == (ghost.salt, ghost.params) and again.g2 != ghost.g2
    assert challenge("alice").salt == real.salt
    # differs between names and between server secrets
    assert challenge("ghost2").salt != ghost.salt
    assert challenge("ghost", Secret(b"\xa5" * 32)).salt != ghost.salt
    assert fake_record(SERVER_SECRET, "ghost", KDF).salt == ghost.salt


@pytest.mark.parametrize("password", ["", "pw", PASSWORDS["alice"]])
def test_unknown_user_fails_at_confirmation(records: dict[str, VerifierRecord], password: str) -> None:
    client = ClientHandshake("ghost", SITE, PasswordSecret(password))
    server = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    confirm = client.respond(server.challenge(client.start()))  # passes 1-3 run as for a real user
    assert not server.known_user
    with pytest.raises(AuthenticationFailed):
        server.confirm(confirm)
    with pytest.raises(RuntimeError):
        server.grant(b"keys", CONTEXT, 1)


# --- 9. frozen vectors ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


def test_vectors_every_intermediate(vectors: dict[str, Any]) -> None:
    inp = vector_inputs_from_json(vectors["inputs"])
    assert vectors["suite"] == SUITE
    recorded = {k: bytes.fromhex(v) for k, v in vectors["intermediates"].items()}
    computed = spec_exchange(inp)
    assert set(recorded) == set(computed)
    for name, value in computed.items():
        assert recorded[name] == value, name


def test_vectors_through_primitives(vectors: dict[str, Any]) -> None:
    """The same intermediates step by step through primitives.py, the way amp.py goes."""
    inp = vector_inputs_from_json(vectors["inputs"])
    r = {k: bytes.fromhex(v) for k, v in vectors["intermediates"].items()}
    user, site, salt, params = inp["user"], inp["site"], inp["salt"], inp["params"]
    w = P.argon2id(inp["password"].encode(), salt, params, P.lp(SUITE, user, site))
    assert w.value == r["w"]
    pi = P.scalar_reduce(w.value)
    assert pi == r["pi"] and P.base_mul(pi) == r["V"]
    x, y = P.random_scalar(Scripted(inp["x_wide"])), P.random_scalar(Scripted(inp["y_wide"]))
    assert (x, y) == (r["x"], r["y"])
    g1 = P.base_mul(x)
    tt1 = P.lp(SUITE, user, site, salt, params.encode(), g1)
    assert (g1, tt1) == (r["G1"], r["TT1"])
    e1 = P.hash_to_scalar("e1", tt1)
    g2 = P.point_mul(y, P.point_add(P.point_mul(e1, g1), r["V"]))
    tt = P.lp(tt1, g2)
    e2 = P.hash_to_scalar("e2", tt)
    assert (e1, g2, tt, e2) == (r["e1"], r["G2"], r["TT"], r["e2"])
    d = P.scalar_add(P.scalar_mul(x, e1), pi)
    omega = P.scalar_mul(P.scalar_invert(d), P.scalar_add(x, e2))
    alpha = P.point_mul(omega, g2)
    beta = P.point_mul(y, P.point_add(g1, P.base_mul(e2)))
    assert (d, omega, alpha, beta) == (r["d"], r["omega"], r["alpha"], r["alpha"])
    th = P.sha256(tt)
    prk = P.hkdf_extract(th, alpha)
    okm = P.hkdf_expand(prk, b"AMP-v1 keys" + P.lp(SUITE, site), 64)
    assert P.hkdf(alpha, th, b"AMP-v1 keys" + P.lp(SUITE, site), 64) == okm
    assert (th, prk) == (r["TH"], r["PRK"])
    assert okm == r["K_cC"] + r["K_cS"] + r["K_wrap"] + r["K_sess"]
    assert P.hmac_sha256(r["K_cC"], b"AMP client confirm" + th) == r["H_C"]
    assert P.hmac_sha256(r["K_cS"], b"AMP server confirm" + th) == r["H_S"]
    assert P.Aead(r["K_wrap"]).seal(inp["nonce"], inp["payload"], r["AD"]) == r["wrapped"]
    assert P.Aead(r["K_wrap"]).open(r["nonce"], r["wrapped"], r["AD"]) == inp["payload"]


def test_vectors_through_the_handshake(vectors: dict[str, Any]) -> None:
    inp = vector_inputs_from_json(vectors["inputs"])
    r = {k: bytes.fromhex(v) for k, v in vectors["intermediates"].items()}
    got = replay_with_objects(inp)
    assert got["record"].salt == inp["salt"] and got["record"].verifier == r["V"]
    assert got["pi"] == r["pi"]
    assert got["hello"] == Hello(inp["user"], r["G1"])
    assert got["challenge"] == Challenge(r["G2"], inp["salt"], inp["params"])
    assert got["confirm"] == Confirm(r["H_C"])
    assert got["grant"] == Grant(r["H_S"], r["nonce"], r["wrapped"], inp["version"])
    assert got["payload"] == inp["payload"]
    assert got["K_sess_client"] == got["K_sess_server"] == r["K_sess"]


def test_vectors_fake_record(vectors: dict[str, Any]) -> None:
    f = vectors["fake_record"]
    secret = bytes.fromhex(f["server_secret"])
    rec = fake_record(Secret(secret), f["user"], KDF)
    assert rec.salt.hex() == f["salt"] and rec.verifier.hex() == f["V"]
    assert spec_fake_record(secret, f["user"]) == {"salt": rec.salt, "V": rec.verifier}


# --- the handshake's own rules: redaction, one-shot state, cached credentials ------------------------------


def test_reprs_never_show_secrets(vectors: dict[str, Any]) -> None:
    inp = vector_inputs_from_json(vectors["inputs"])
    r = spec_exchange(inp)
    secrets = [r[k] for k in ("w", "pi", "x", "y", "d", "omega", "alpha", "PRK", "K_cC", "K_cS", "K_wrap", "K_sess")]
    record = make_verifier(inp["user"], inp["site"], inp["password"], inp["params"], rng=Scripted(inp["salt"]))
    password = PasswordSecret(inp["password"])
    client = ClientHandshake(inp["user"], inp["site"], password, rng=Scripted(inp["x_wide"]))
    server = ServerHandshake(inp["site"], {inp["user"]: record}.get, SERVER_SECRET, fake_params=inp["params"],
                             rng=Scripted(inp["y_wide"], inp["nonce"]))
    scalar = ScalarSecret(Secret(r["pi"]), inp["salt"], inp["params"])
    texts: list[str] = []

    def look(*objs: object) -> None:
        for o in objs:
            texts.extend((repr(o), str(o), f"{o!r}"))

    look(client, server, record, password, scalar, Secret(r["K_sess"]), P.Aead(r["K_wrap"]))
    ch = server.challenge(client.start())
    look(client, server)
    cf = client.respond(ch)
    look(client, server, password)
    server.confirm(cf)
    look(client, server)
    grant, k_server = server.grant(inp["payload"], inp["context"], inp["version"])
    look(client, server, k_server)
    _, k_client = client.finish(grant, inp["context"])
    look(client, server, k_client)
    for text in texts:
        for s in secrets + [record.verifier]:
            assert s.hex() not in text and s.hex().upper() not in text and repr(s) not in text, text
        assert inp["password"] not in text
    assert record.verifier.hex() not in repr(record) and "redacted" in repr(record)


def test_secrets_and_user_secrets_do_not_pickle() -> None:
    import pickle

    for obj in (Secret(b"k" * 16), ScalarSecret(Secret(b"k" * 32), b"s" * 16, KDF)):
        with pytest.raises(TypeError):
            pickle.dumps(obj)


def test_scalar_secret_out_of_date(records: dict[str, VerifierRecord]) -> None:
    rec = records["alice"]
    pi = pi_of(rec, PASSWORDS["alice"])
    assert run(records, "alice", ScalarSecret(pi, rec.salt, KDF)).ok
    for stale in (ScalarSecret(pi, bytes(16), KDF), ScalarSecret(pi, rec.salt, KdfParams(t=2, p=1, m_kib=64))):
        client = ClientHandshake("alice", SITE, stale)
        server = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
        ch = server.challenge(client.start())
        with pytest.raises(CredentialsOutOfDate) as info:
            client.respond(ch)
        assert isinstance(info.value, UbiError)
        with pytest.raises(RuntimeError):
            client.respond(ch)
        with pytest.raises(RuntimeError):
            client.finish(Grant(b"", b"", b"", 1), CONTEXT)
        # the server gets nothing and its exchange stays unconfirmed
        with pytest.raises(RuntimeError):
            server.grant(b"keys", CONTEXT, 1)


def test_password_secret_derives_once_per_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = amp.password_scalar

    def counting(password: str, user: str, site: str, salt: bytes, params: KdfParams) -> Secret:
        calls.append(salt)
        return real(password, user, site, salt, params)

    monkeypatch.setattr(amp, "password_scalar", counting)
    rec1 = make_verifier("alice", SITE, "pw", KDF)
    calls.clear()
    secret = PasswordSecret("pw")
    for _ in range(4):
        assert run({"alice": rec1}, "alice", secret).ok
    assert calls == [rec1.salt]
    rec2 = make_verifier("alice", SITE, "pw", KDF)  # re-registered: new salt
    calls.clear()
    for _ in range(3):
        assert run({"alice": rec2}, "alice", secret).ok
        assert run({"alice": rec1}, "alice", secret).ok
    assert calls == [rec2.salt]


def test_server_is_one_shot(records: dict[str, VerifierRecord]) -> None:
    client = ClientHandshake("bob", SITE, PasswordSecret(PASSWORDS["bob"]))
    server = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    with pytest.raises(RuntimeError):
        server.grant(b"keys", CONTEXT, 1)  # before anything
    hello = client.start()
    ch = server.challenge(hello)
    with pytest.raises(RuntimeError):
        server.challenge(hello)
    with pytest.raises(RuntimeError):
        server.grant(b"keys", CONTEXT, 1)  # before confirm
    confirm = client.respond(ch)
    server.confirm(confirm)
    with pytest.raises(AuthenticationFailed):
        server.confirm(confirm)  # a second pass 3
    with pytest.raises(RuntimeError):
        server.grant(b"keys", CONTEXT, 1)  # and the exchange is over
    fresh = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    with pytest.raises(AuthenticationFailed):
        fresh.confirm(confirm)  # pass 3 with no pass 2


def test_client_is_one_shot(records: dict[str, VerifierRecord]) -> None:
    client = ClientHandshake("bob", SITE, PasswordSecret(PASSWORDS["bob"]))
    server = ServerHandshake(SITE, records.get, SERVER_SECRET, fake_params=KDF)
    with pytest.raises(RuntimeError):
        client.respond(Challenge(b"", b"", KDF))
    with pytest.raises(RuntimeError):
        client.finish(Grant(b"", b"", b"", 1), CONTEXT)
    ch = server.challenge(client.start())
    with pytest.raises(RuntimeError):
        client.start()
    server.confirm(client.respond(ch))
    with pytest.raises(RuntimeError):
        client.respond(ch)
    grant, _ = server.grant(b"keys", CONTEXT, 1)
    client.finish(grant, CONTEXT)
    with pytest.raises(RuntimeError):
        client.finish(grant, CONTEXT)
