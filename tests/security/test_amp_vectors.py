"""The AMP-style key exchange against its frozen known-answer vectors (test group 9 of
shared/design/amp.md): tests/vectors/amp_v1.json, made once by
tests/vectors/make_amp_vectors.py and never by these tests.

Every intermediate is recomputed three ways: by the profile's algebra in closed form
(``amp_reference.spec_exchange``), step by step through ubicore.security.primitives the way
amp.py goes, and by replaying the exchange through the handshake objects with the same
injected randomness; the stand-in record for an unknown user is checked too.
"""
from __future__ import annotations

from typing import Any

from ubicore.security import primitives as P
from ubicore.security.amp import (
    SUITE,
    Challenge,
    Confirm,
    Grant,
    Hello,
    fake_record,
)
from ubicore.security.primitives import Secret

from .amp_reference import (
    KDF,
    Scripted,
    replay_with_objects,
    spec_exchange,
    spec_fake_record,
    vector_inputs_from_json,
)

# --- 9. frozen vectors ----------------------------------------------------------------------------------


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
