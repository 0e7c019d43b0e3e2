"""The one module that touches cryptographic primitives.

Everything here is a thin, typed call into a well-kept library: the edwards25519 group
from libsodium (through PyNaCl's bindings), Argon2id, HKDF, HMAC, SHA-2 and AES-128-GCM
from ``cryptography``. The project implements no primitive itself. Callers above this
module (the handshake, the session crypto) never see a library exception: a point that
fails validation is :class:`InvalidElement`, a scalar that is zero is
:class:`DegenerateScalar`, a failed AEAD open is :class:`~ubicore.errors.DecryptionFailed`.

Secrets live in :class:`Secret`, whose ``repr`` and ``str`` never show the bytes.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from nacl import bindings as _na
from nacl.exceptions import CryptoError

from ..errors import DecryptionFailed, UbiError

Rng = Callable[[int], bytes]
"""Randomness source: ``rng(n)`` returns n random bytes (``os.urandom`` unless a test injects one)."""

L = 2**252 + 27742317777372353535851937790883648493
"""Order of the prime-order subgroup of edwards25519."""
POINT_BYTES = 32
SCALAR_BYTES = 32
AES_KEY_BYTES = 16
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16


class InvalidElement(UbiError):
    """A received group element is not a valid point of the prime-order subgroup (or is
    the identity). The exchange is aborted."""


class DegenerateScalar(UbiError):
    """A scalar came out as zero (bad randomness or a degenerate transcript). The exchange
    is aborted."""


class Secret:
    """Bytes that must never reach a log: ``repr`` and ``str`` are redacted.

    Compare with :meth:`equals` (constant time). ``value`` hands out the bytes to the
    primitive that needs them.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    @property
    def value(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def equals(self, other: Secret | bytes) -> bool:
        theirs = other.value if isinstance(other, Secret) else other
        return _hmac.compare_digest(self._value, theirs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Secret, bytes)):
            return self.equals(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Secret {len(self._value)} bytes redacted>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("secrets are not picklable")


# --- encoding helpers ---------------------------------------------------------------------


def lp(*parts: bytes | str) -> bytes:
    """Length-prefixed concatenation: each part preceded by its 4-byte big-endian length
    (str parts as UTF-8)."""
    out = bytearray()
    for part in parts:
        b = part.encode() if isinstance(part, str) else bytes(part)
        out += struct.pack(">I", len(b))
        out += b
    return bytes(out)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return _hmac.digest(key, data, "sha256")  # the one-shot C path


def ct_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two byte strings."""
    return _hmac.compare_digest(a, b)


# --- the group ------------------------------------------------------------------------------


def is_valid_point(p: bytes) -> bool:
    """Exact length, canonical, on the curve, in the prime-order subgroup, not the identity."""
    return type(p) is bytes and len(p) == POINT_BYTES and bool(_na.crypto_core_ed25519_is_valid_point(p))


def check_point(p: Any) -> bytes:
    if not isinstance(p, bytes) or not is_valid_point(bytes(p)):
        raise InvalidElement("invalid group element")
    return bytes(p)


def scalar_reduce(wide: bytes) -> bytes:
    """A 64-byte string reduced modulo L (32 bytes, little-endian)."""
    assert len(wide) == 64
    return bytes(_na.crypto_core_ed25519_scalar_reduce(wide))


def scalar_from_int(n: int) -> bytes:
    """Only for public values and tests: an integer as a reduced scalar."""
    return (n % L).to_bytes(SCALAR_BYTES, "little")


def scalar_to_int(s: bytes) -> int:
    return int.from_bytes(s, "little")


def scalar_is_zero(s: bytes) -> bool:
    return ct_equal(s, bytes(SCALAR_BYTES))


def nonzero(s: bytes) -> bytes:
    if scalar_is_zero(s):
        raise DegenerateScalar("degenerate scalar")
    return s


def random_scalar(rng: Rng = os.urandom) -> bytes:
    """A scalar in [1, L-1] from 64 random bytes reduced mod L; zero aborts."""
    wide = rng(64)
    if len(wide) != 64:
        raise DegenerateScalar("randomness source returned the wrong length")
    return nonzero(scalar_reduce(wide))


def scalar_mul(a: bytes, b: bytes) -> bytes:
    return bytes(_na.crypto_core_ed25519_scalar_mul(a, b))


def scalar_add(a: bytes, b: bytes) -> bytes:
    return bytes(_na.crypto_core_ed25519_scalar_add(a, b))


def scalar_invert(a: bytes) -> bytes:
    """Constant-time inverse mod L (libsodium); zero aborts."""
    nonzero(a)
    try:
        return bytes(_na.crypto_core_ed25519_scalar_invert(a))
    except (CryptoError, RuntimeError):
        raise DegenerateScalar("degenerate scalar") from None


# libsodium's unclamped scalar multiplications refuse, by themselves, a point that is not
# canonical, of small order or outside the prime-order subgroup, and an identity result
# (returning -1, which PyNaCl raises). A non-zero multiple of a subgroup point stays in the
# subgroup, so their results need no second check; sums do (the identity is a valid sum).


def base_mul(s: bytes) -> bytes:
    """[s]B without clamping; a zero scalar is refused."""
    try:
        return bytes(_na.crypto_scalarmult_ed25519_base_noclamp(nonzero(s)))
    except (CryptoError, RuntimeError, TypeError, ValueError):
        raise DegenerateScalar("degenerate scalar") from None


def point_mul(s: bytes, p: bytes) -> bytes:
    """[s]P without clamping; libsodium validates P and refuses an identity result."""
    if type(p) is not bytes or len(p) != POINT_BYTES:
        raise InvalidElement("invalid group element")
    try:
        return bytes(_na.crypto_scalarmult_ed25519_noclamp(nonzero(s), p))
    except (CryptoError, RuntimeError, TypeError, ValueError):
        raise InvalidElement("invalid group element") from None


def point_add(p: bytes, q: bytes) -> bytes:
    """P + Q; both validated (libsodium's addition takes any decodable point) and an
    identity sum refused."""
    check_point(p)
    check_point(q)
    try:
        r = bytes(_na.crypto_core_ed25519_add(p, q))
    except (CryptoError, RuntimeError, TypeError, ValueError):
        raise InvalidElement("invalid group element") from None
    return check_point(r)


def x25519_keypair() -> tuple[Secret, bytes]:
    """An ephemeral X25519 key pair: (private key, public key)."""
    private = X25519PrivateKey.generate()
    return Secret(private.private_bytes_raw()), private.public_key().public_bytes_raw()


def x25519(private: Secret, peer_public: Any) -> bytes:
    """The X25519 shared secret; InvalidElement for a malformed or low-order public key."""
    if type(peer_public) is not bytes or len(peer_public) != POINT_BYTES:
        raise InvalidElement("an X25519 public key is 32 bytes")
    try:
        return X25519PrivateKey.from_private_bytes(private.value).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # the all-zero shared secret of a low-order point
        raise InvalidElement("X25519 public key of low order") from None


def hash_to_scalar(label: str, transcript: bytes, suite_tag: str = "AMP-v1") -> bytes:
    """H2S(label, T) = SHA-512(lp(tag, label, T)) mod L."""
    return scalar_reduce(sha512(lp(suite_tag, label, transcript)))


# --- password KDF ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id costs: ``t`` passes, ``p`` lanes, ``m_kib`` memory in KiB."""

    t: int = 3
    p: int = 4
    m_kib: int = 64 * 1024

    def encode(self) -> bytes:
        """The canonical encoding bound into transcripts: ``"argon2id"`` then t, p, m."""
        return lp("argon2id", str(self.t), str(self.p), str(self.m_kib))

    def check(self) -> KdfParams:
        """Refuse costs outside what Argon2id allows or what we are willing to spend."""
        if not (1 <= self.t <= 64 and 1 <= self.p <= 64 and 8 * self.p <= self.m_kib <= 4 * 1024 * 1024):
            raise ValueError("Argon2id parameters out of range")
        return self


DEFAULT_KDF = KdfParams()


def argon2id(password: bytes, salt: bytes, params: KdfParams, ad: bytes, length: int = 64) -> Secret:
    params.check()
    kdf = Argon2id(
        salt=salt, length=length, iterations=params.t, lanes=params.p, memory_cost=params.m_kib, ad=ad
    )
    return Secret(kdf.derive(password))


# --- HKDF -------------------------------------------------------------------------------------


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869): HMAC(salt, IKM)."""
    return hmac_sha256(salt, ikm)


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(prk)


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


# --- AES-128-GCM ------------------------------------------------------------------------------


class Aead:
    """AES-128-GCM under one key. Callers pass nonces built by the session layer, never
    their own; :meth:`open` raises only :class:`DecryptionFailed`."""

    __slots__ = ("_aead", "seal")

    seal: Callable[[bytes, bytes, bytes], bytes]
    """``seal(nonce, plaintext, ad)``: the ciphertext with its tag (AESGCM.encrypt itself:
    sealing cannot fail on inputs the session layer builds, and this is per message)."""

    def __init__(self, key: Secret | bytes) -> None:
        raw = key.value if isinstance(key, Secret) else key
        if len(raw) != AES_KEY_BYTES:
            raise ValueError("AES-128 needs a 16-byte key")
        self._aead = AESGCM(raw)
        self.seal = self._aead.encrypt

    def open(self, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, ciphertext, ad)
        except (InvalidTag, ValueError, TypeError, OverflowError):
            raise DecryptionFailed() from None

    def __repr__(self) -> str:
        return "<Aead key redacted>"


def random_key(rng: Rng = os.urandom) -> Secret:
    """A fresh AES-128 key."""
    key = rng(AES_KEY_BYTES)
    if len(key) != AES_KEY_BYTES:
        raise ValueError("randomness source returned the wrong length")
    return Secret(key)
