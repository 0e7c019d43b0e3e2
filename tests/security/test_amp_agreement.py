"""The AMP-style key exchange (ubicore/security/amp.py) doing its job between honest
parties: test groups 1 (agreement), 2 (wrong password), 3 (freshness and replay) and 8
(enumeration) of shared/design/amp.md, "Tests any correct implementation passes".

The reference client of ``amp_reference`` (the profile written out again) is checked to
be accepted by the real server, so the key schedule the attack tests use is the real one.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ubicore.errors import AuthenticationFailed
from ubicore.security import amp
from ubicore.security import primitives as P
from ubicore.security.amp import (
    Challenge,
    ClientHandshake,
    Confirm,
    Hello,
    PasswordSecret,
    ScalarSecret,
    ServerHandshake,
    VerifierRecord,
    fake_record,
    make_verifier,
)
from ubicore.security.primitives import Secret

from .amp_reference import (
    CONTEXT,
    KDF,
    PASSWORDS,
    SERVER_SECRET,
    SITE,
    L,
    Scripted,
    _base,
    _h2s,
    _int,
    _sc,
    pi_of,
    run,
    spec_ad,
    spec_h_c,
    spec_h_s,
    spec_keys,
    spec_tt1,
)

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
