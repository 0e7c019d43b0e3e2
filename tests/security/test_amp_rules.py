"""The AMP handshake's own rules (ubicore/security/amp.py), beyond the profile's test groups:
no secret in any repr and none pickles, cached credentials (``ScalarSecret`` out of date,
``PasswordSecret`` deriving once per salt), and client and server handshakes that are
one-shot state machines.
"""
from __future__ import annotations

from typing import Any

import pytest

from ubicore.errors import AuthenticationFailed, UbiError
from ubicore.security import amp
from ubicore.security import primitives as P
from ubicore.security.amp import (
    Challenge,
    ClientHandshake,
    CredentialsOutOfDate,
    Grant,
    PasswordSecret,
    ScalarSecret,
    ServerHandshake,
    VerifierRecord,
    make_verifier,
)
from ubicore.security.primitives import KdfParams, Secret

from .amp_reference import (
    CONTEXT,
    KDF,
    PASSWORDS,
    SERVER_SECRET,
    SITE,
    Scripted,
    pi_of,
    run,
    spec_exchange,
    vector_inputs_from_json,
)

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
