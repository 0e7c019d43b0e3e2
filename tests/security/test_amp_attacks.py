"""The AMP-style key exchange (ubicore/security/amp.py) under attack: test groups 4 (stolen
verifier), 5 (element rejection), 6 (binding) and 7 (degenerate scalars) of
shared/design/amp.md, "Tests any correct implementation passes".

The stolen-verifier attack is kept honest by ``amp_reference.NaiveServer`` (AMP with
β = [y]G1): the same computation must beat it and must not beat ``ServerHandshake``. The
man in the middle of groups 5 and 6 is ``amp_reference.run``'s ``on_*`` hooks.
"""
from __future__ import annotations

import dataclasses
import os

import pytest

from ubicore.errors import AuthenticationFailed, UbiError
from ubicore.security import amp
from ubicore.security import primitives as P
from ubicore.security.amp import (
    Challenge,
    ClientHandshake,
    Confirm,
    Grant,
    Hello,
    PasswordSecret,
    ScalarSecret,
    ServerHandshake,
    VerifierRecord,
    make_verifier,
)
from ubicore.security.primitives import DegenerateScalar, KdfParams, Secret

from .amp_reference import (
    CONTEXT,
    KDF,
    PASSWORDS,
    SERVER_SECRET,
    SITE,
    L,
    NaiveServer,
    Scripted,
    _base,
    _h2s,
    _int,
    _sc,
    attack,
    flip,
    naive_client_confirm,
    pi_of,
    run,
    spec_tt1,
)
from .test_primitives import BAD_ELEMENTS

# --- 4. stolen verifier -------------------------------------------------------------------------------


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
