"""The primitives module: the group (checked against an independent pure-Python
edwards25519), element validation against every kind of bad encoding, scalars, the
password KDF and HKDF against their RFC vectors, AES-128-GCM and the redacted Secret.

The pure-Python curve below is test-only: it is slow, not constant time, and exists so
the tests can build torsion points and non-canonical encodings libsodium would refuse to
make, and can check libsodium's answers against a second implementation.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ubicore.errors import DecryptionFailed, UbiError
from ubicore.security import primitives as P
from ubicore.security.primitives import (
    DegenerateScalar,
    InvalidElement,
    KdfParams,
    Secret,
)

# --- a tiny, independent edwards25519 (affine, complete addition; tests only) -----------------

FIELD_P = 2**255 - 19
CURVE_D = (-121665 * pow(121666, -1, FIELD_P)) % FIELD_P
SQRT_M1 = pow(2, (FIELD_P - 1) // 4, FIELD_P)
IDENTITY = (0, 1)


def ed_recover_x(y: int, sign: int) -> int | None:
    """The x with -x² + y² = 1 + d x² y² and the given sign bit, or None if y is not on the curve."""
    u = (y * y - 1) % FIELD_P
    v = (CURVE_D * y * y + 1) % FIELD_P
    x2 = u * pow(v, -1, FIELD_P) % FIELD_P
    if x2 == 0:
        return 0
    x = pow(x2, (FIELD_P + 3) // 8, FIELD_P)
    if (x * x - x2) % FIELD_P:
        x = x * SQRT_M1 % FIELD_P
    if (x * x - x2) % FIELD_P:
        return None
    return x if x & 1 == sign else FIELD_P - x


def ed_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = CURVE_D * x1 * x2 * y1 * y2 % FIELD_P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, -1, FIELD_P) % FIELD_P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, -1, FIELD_P) % FIELD_P
    return x3, y3


def ed_mul(k: int, p: tuple[int, int]) -> tuple[int, int]:
    r = IDENTITY
    while k:
        if k & 1:
            r = ed_add(r, p)
        p = ed_add(p, p)
        k >>= 1
    return r


def ed_encode(p: tuple[int, int]) -> bytes:
    return (p[1] | ((p[0] & 1) << 255)).to_bytes(32, "little")


def ed_decode(b: bytes) -> tuple[int, int]:
    n = int.from_bytes(b, "little")
    y, sign = n & ((1 << 255) - 1), n >> 255
    assert y < FIELD_P
    x = ed_recover_x(y, sign)
    assert x is not None
    return x, y


BASE_Y = 4 * pow(5, -1, FIELD_P) % FIELD_P
BASE = (ed_recover_x(BASE_Y, 0), BASE_Y)


def _torsion_generator() -> tuple[int, int]:
    """A point of order exactly 8: [L]Q for the first curve point Q whose [L]Q has order 8."""
    y = 2
    while True:
        x = ed_recover_x(y, 0)
        if x is not None:
            t = ed_mul(P.L, (x, y))
            if ed_mul(4, t) != IDENTITY:
                return t
        y += 1


T8 = _torsion_generator()
SMALL_ORDER_POINTS = [ed_encode(ed_mul(k, T8)) for k in range(8)]
"""The eight points of order dividing 8 (the identity among them), computed."""

SMALL_ORDER_HEX = {
    "0100000000000000000000000000000000000000000000000000000000000000",  # identity
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
}


def _noncanonical_encodings() -> list[bytes]:
    """Encodings with y ≥ p of points that are on the curve (y - p < 19 is all there is),
    and the "negative zero" encodings (x = 0 with the sign bit set)."""
    out = []
    for y0 in range(2**255 - FIELD_P):
        for sign in (0, 1):
            if ed_recover_x(y0, sign) is not None:
                out.append(((y0 + FIELD_P) | (sign << 255)).to_bytes(32, "little"))
    out.append((1 | (1 << 255)).to_bytes(32, "little"))  # -0 identity
    out.append(((FIELD_P - 1) | (1 << 255)).to_bytes(32, "little"))  # -0 order-2 point
    return out


def _off_curve() -> bytes:
    y = 2
    while ed_recover_x(y, 0) is not None:
        y += 1
    return y.to_bytes(32, "little")


VALID = ed_encode(ed_mul(123456789, BASE))
"""A valid prime-order-subgroup point, built without libsodium."""

BAD_ELEMENTS: list[tuple[str, object]] = (
    [(f"small-order-{i}", p) for i, p in enumerate(SMALL_ORDER_POINTS)]
    + [(f"torsion-{k}", ed_encode(ed_add(ed_decode(VALID), ed_mul(k, T8)))) for k in (1, 2, 4, 7)]
    + [(f"noncanonical-{i}", p) for i, p in enumerate(_noncanonical_encodings())]
    + [
        ("off-curve", _off_curve()),
        ("all-ones", b"\xff" * 32),
        ("empty", b""),
        ("31-bytes", VALID[:31]),
        ("33-bytes", VALID + b"\x00"),
        ("64-bytes", VALID + VALID),
        ("bytearray", bytearray(VALID)),
        ("memoryview", memoryview(VALID)),
        ("hex-str", VALID.hex()),
        ("none", None),
        ("int", int.from_bytes(VALID, "little")),
        ("list", list(VALID)),
    ]
)
"""Every kind of element a receiver must refuse; shared with the handshake tests."""


# --- the curve helper itself ------------------------------------------------------------------


def test_reference_curve_agrees_with_libsodium() -> None:
    assert ed_encode(BASE) == P.base_mul(P.scalar_from_int(1))
    for _ in range(5):
        k = P.scalar_to_int(P.random_scalar())
        assert ed_encode(ed_mul(k, BASE)) == P.base_mul(P.scalar_from_int(k))
    assert ed_mul(P.L, BASE) == IDENTITY


def test_small_order_points_are_the_known_eight() -> None:
    assert {p.hex() for p in SMALL_ORDER_POINTS} == SMALL_ORDER_HEX
    for p in SMALL_ORDER_POINTS:
        assert ed_mul(8, ed_decode(p)) == IDENTITY


# --- element validation ----------------------------------------------------------------------


@pytest.mark.parametrize("label,element", BAD_ELEMENTS, ids=[b[0] for b in BAD_ELEMENTS])
def test_check_point_refuses(label: str, element: object) -> None:
    assert not (isinstance(element, bytes) and P.is_valid_point(element))
    with pytest.raises(InvalidElement):
        P.check_point(element)


@pytest.mark.parametrize("label,element", BAD_ELEMENTS, ids=[b[0] for b in BAD_ELEMENTS])
def test_group_operations_refuse_bad_inputs(label: str, element: object) -> None:
    s = P.random_scalar()
    with pytest.raises(InvalidElement):
        P.point_mul(s, element)  # type: ignore[arg-type]
    with pytest.raises(InvalidElement):
        P.point_add(VALID, element)  # type: ignore[arg-type]
    with pytest.raises(InvalidElement):
        P.point_add(element, VALID)  # type: ignore[arg-type]


def test_valid_points_pass() -> None:
    assert P.check_point(VALID) == VALID
    neg = VALID[:31] + bytes([VALID[31] ^ 0x80])  # -P: same subgroup
    assert P.is_valid_point(neg)


def test_computed_identities_refused() -> None:
    neg = VALID[:31] + bytes([VALID[31] ^ 0x80])
    with pytest.raises(InvalidElement):
        P.point_add(VALID, neg)  # P + (-P)
    with pytest.raises(InvalidElement):
        P.point_mul(P.L.to_bytes(32, "little"), VALID)  # [L]P, unreduced scalar
    with pytest.raises(DegenerateScalar):
        P.point_mul(bytes(32), VALID)
    with pytest.raises(DegenerateScalar):
        P.base_mul(bytes(32))


# --- group algebra ----------------------------------------------------------------------------


def test_group_algebra() -> None:
    for _ in range(10):
        a, b = P.random_scalar(), P.random_scalar()
        ia, ib = P.scalar_to_int(a), P.scalar_to_int(b)
        A, B_ = P.base_mul(a), P.base_mul(b)
        assert P.point_mul(a, B_) == P.point_mul(b, A) == P.base_mul(P.scalar_from_int(ia * ib))
        assert P.point_add(A, B_) == P.base_mul(P.scalar_from_int(ia + ib))
        assert P.scalar_mul(a, b) == P.scalar_from_int(ia * ib)
        assert P.scalar_add(a, b) == P.scalar_from_int(ia + ib)
        inv = P.scalar_invert(a)
        assert P.scalar_to_int(inv) * ia % P.L == 1
        assert P.scalar_to_int(inv) == pow(ia, -1, P.L)


def test_no_clamping() -> None:
    # A clamped multiply would change these scalars (low bits, bit 254); ours must not.
    for k in (1, 2, 3, 7, 8, P.L - 1, 2**200 + 5):
        assert P.base_mul(P.scalar_from_int(k)) == ed_encode(ed_mul(k, BASE))


def test_scalars() -> None:
    wide = os.urandom(64)
    assert P.scalar_to_int(P.scalar_reduce(wide)) == int.from_bytes(wide, "little") % P.L
    assert P.scalar_from_int(P.L + 5) == P.scalar_from_int(5)
    assert P.scalar_is_zero(bytes(32)) and not P.scalar_is_zero(P.scalar_from_int(1))
    with pytest.raises(DegenerateScalar):
        P.nonzero(bytes(32))
    with pytest.raises(DegenerateScalar):
        P.scalar_invert(bytes(32))


@pytest.mark.parametrize(
    "wide",
    [
        bytes(64),
        P.L.to_bytes(64, "little"),
        (2 * P.L).to_bytes(64, "little"),
        (P.L * (2**259)).to_bytes(64, "little"),
        b"\x01" * 10,  # wrong length
        b"",
    ],
    ids=["zeros", "L", "2L", "L*2^259", "short", "empty"],
)
def test_random_scalar_refuses_degenerate_randomness(wide: bytes) -> None:
    with pytest.raises(DegenerateScalar):
        P.random_scalar(lambda n: wide)


def test_random_scalar_from_L_plus_one_is_one() -> None:
    assert P.random_scalar(lambda n: (P.L + 1).to_bytes(64, "little")) == P.scalar_from_int(1)


def test_hash_to_scalar_matches_the_profile() -> None:
    t = b"transcript"
    expected = int.from_bytes(hashlib.sha512(P.lp("AMP-v1", "e1", t)).digest(), "little") % P.L
    assert P.scalar_to_int(P.hash_to_scalar("e1", t)) == expected
    assert P.hash_to_scalar("e1", t) != P.hash_to_scalar("e2", t)


def test_lp() -> None:
    assert P.lp("ab", b"\x00", b"") == b"\x00\x00\x00\x02ab\x00\x00\x00\x01\x00\x00\x00\x00\x00"
    assert P.lp("é") == b"\x00\x00\x00\x02\xc3\xa9"
    # length prefixes keep boundaries: no two different part lists collide like this
    assert P.lp("ab", "c") != P.lp("a", "bc")


def test_hashes_and_mac() -> None:
    assert P.sha256(b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert P.sha512(b"abc").hex().startswith("ddaf35a193617aba")
    # RFC 4231 test case 2
    assert (
        P.hmac_sha256(b"Jefe", b"what do ya want for nothing?").hex()
        == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )
    assert P.ct_equal(b"abc", b"abc") and not P.ct_equal(b"abc", b"abd") and not P.ct_equal(b"a", b"ab")


# --- known answers: Argon2id (RFC 9106 §5.3) and HKDF (RFC 5869) ---------------------------------

RFC9106_TAG = "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"


def test_argon2id_rfc9106_vector() -> None:
    kdf = Argon2id(
        salt=b"\x02" * 16, length=32, iterations=3, lanes=4, memory_cost=32, ad=b"\x04" * 12, secret=b"\x03" * 8
    )
    assert kdf.derive(b"\x01" * 32).hex() == RFC9106_TAG


def test_primitives_argon2id_is_the_library_call() -> None:
    params = KdfParams(t=3, p=4, m_kib=32)
    ours = P.argon2id(b"\x01" * 32, b"\x02" * 16, params, b"\x04" * 12, length=32)
    lib = Argon2id(salt=b"\x02" * 16, length=32, iterations=3, lanes=4, memory_cost=32, ad=b"\x04" * 12)
    assert isinstance(ours, Secret)
    assert ours.value == lib.derive(b"\x01" * 32)
    assert ours.value.hex() != RFC9106_TAG  # the RFC tag needs the secret we do not use
    # the default output length is 64 and every parameter matters
    base = P.argon2id(b"pw", b"s" * 16, KdfParams(1, 1, 64), b"ad")
    assert len(base) == 64
    for other in (
        P.argon2id(b"pX", b"s" * 16, KdfParams(1, 1, 64), b"ad"),
        P.argon2id(b"pw", b"t" * 16, KdfParams(1, 1, 64), b"ad"),
        P.argon2id(b"pw", b"s" * 16, KdfParams(2, 1, 64), b"ad"),
        P.argon2id(b"pw", b"s" * 16, KdfParams(1, 2, 64), b"ad"),
        P.argon2id(b"pw", b"s" * 16, KdfParams(1, 1, 72), b"ad"),
        P.argon2id(b"pw", b"s" * 16, KdfParams(1, 1, 64), b"aD"),
    ):
        assert not other.equals(base)


@pytest.mark.parametrize(
    "params", [KdfParams(0, 1, 64), KdfParams(65, 1, 64), KdfParams(1, 0, 64), KdfParams(1, 4, 31),
               KdfParams(1, 1, 4 * 1024 * 1024 + 1)]
)
def test_kdf_params_out_of_range(params: KdfParams) -> None:
    with pytest.raises(ValueError):
        params.check()
    with pytest.raises(ValueError):
        P.argon2id(b"pw", b"s" * 16, params, b"")


def test_kdf_params_encoding() -> None:
    assert KdfParams(3, 4, 65536).encode() == P.lp("argon2id", "3", "4", "65536")
    assert P.DEFAULT_KDF == KdfParams(t=3, p=4, m_kib=64 * 1024)


RFC5869_TC1 = {
    "ikm": bytes([0x0B] * 22),
    "salt": bytes(range(0x0D)),
    "info": bytes(range(0xF0, 0xFA)),
    "prk": "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
    "okm": "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
}
RFC5869_TC3 = {
    "ikm": bytes([0x0B] * 22),
    "salt": b"",
    "info": b"",
    "prk": "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
    "okm": "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
}


@pytest.mark.parametrize("tc", [RFC5869_TC1, RFC5869_TC3], ids=["tc1", "tc3"])
def test_hkdf_rfc5869(tc: dict) -> None:
    prk = P.hkdf_extract(tc["salt"] or bytes(32), tc["ikm"])
    assert prk.hex() == tc["prk"]
    assert P.hkdf_expand(prk, tc["info"], 42).hex() == tc["okm"]
    assert P.hkdf(tc["ikm"], tc["salt"], tc["info"], 42).hex() == tc["okm"]


# --- AES-128-GCM ------------------------------------------------------------------------------


def test_aead_round_trip_and_tamper() -> None:
    key = P.random_key()
    assert len(key) == 16
    aead = P.Aead(key)
    nonce = os.urandom(12)
    ct = aead.seal(nonce, b"payload", b"ad")
    assert len(ct) == len(b"payload") + P.GCM_TAG_BYTES
    assert aead.open(nonce, ct, b"ad") == b"payload"
    assert P.Aead(key.value).open(nonce, ct, b"ad") == b"payload"
    for i in range(len(ct) * 8):
        bad = bytearray(ct)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(DecryptionFailed):
            aead.open(nonce, bytes(bad), b"ad")
    with pytest.raises(DecryptionFailed):
        aead.open(nonce, ct, b"aD")
    with pytest.raises(DecryptionFailed):
        aead.open(os.urandom(12), ct, b"ad")
    with pytest.raises(DecryptionFailed):
        P.Aead(P.random_key()).open(nonce, ct, b"ad")
    for junk in (b"", ct[:15], None, "text"):
        with pytest.raises(DecryptionFailed):
            aead.open(nonce, junk, b"ad")  # type: ignore[arg-type]
    with pytest.raises(DecryptionFailed):
        aead.open(b"short", ct, b"ad")
    assert isinstance(DecryptionFailed(), UbiError)


def test_aead_key_length_and_repr() -> None:
    with pytest.raises(ValueError):
        P.Aead(b"k" * 32)
    key = os.urandom(16)
    r = repr(P.Aead(key))
    assert key.hex() not in r and repr(key) not in r
    with pytest.raises(ValueError):
        P.random_key(lambda n: b"x" * 8)


# --- Secret ------------------------------------------------------------------------------------


def test_secret_is_redacted() -> None:
    raw = os.urandom(32)
    s = Secret(raw)
    for text in (repr(s), str(s), f"{s}", "%s" % s, "%r" % (s,), repr([s]), repr({"k": s})):
        assert raw.hex() not in text
        assert raw.hex().upper() not in text
        assert repr(raw) not in text
        assert "redacted" in text


def test_secret_compares_in_constant_time_and_is_unhashable() -> None:
    s = Secret(b"abc")
    assert s.value == b"abc" and len(s) == 3
    assert s.equals(b"abc") and s.equals(Secret(b"abc")) and not s.equals(b"abd")
    assert s == b"abc" and s == Secret(b"abc") and s != Secret(b"xyz")
    assert (s == "abc") is False
    with pytest.raises(TypeError):
        hash(s)
    assert Secret(bytearray(b"abc")).value == b"abc"  # a copy as bytes


def test_secret_is_not_picklable_or_copyable() -> None:
    s = Secret(os.urandom(16))
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(s, protocol=proto)
    with pytest.raises(TypeError):
        pickle.dumps({"wrapped": [s]})
    with pytest.raises(TypeError):
        copy.copy(s)
    with pytest.raises(TypeError):
        copy.deepcopy(s)
