"""The AMP-style password-authenticated key exchange (profile: shared/design/amp.md).

Theory of operation. The server keeps, per user, a *verifier record* (salt, Argon2id
parameters, V = [π]B) where π is the password-derived scalar; V is not
password-equivalent. A login is four passes::

    1. C → S  Hello      user, G1 = [x]B
    2. S → C  Challenge  G2 = [y]([e1]G1 + V), salt, params        (nothing keyed)
    3. C → S  Confirm    H_C = HMAC(K_cC, "AMP client confirm" ‖ SHA-256(TT))
    4. S → C  Grant      H_S, then the data keys wrapped under K_wrap

Both sides reach the same secret point, α = [ω]G2 on the client with
ω = (x·e1 + π)⁻¹(x + e2), β = [y](G1 + [e2]B) on the server, exactly when the client's
π matches V. The e2 term is what stops a thief holding only V from posing as the client.
Keys come from HKDF over α with the transcript hash as salt: K_cC ‖ K_cS ‖ K_wrap ‖ K_sess.

The client confirms first: G1 does not depend on the password, so nothing the server
sends before checking H_C may depend on β (an attacker could test passwords offline
against it). A wrong H_C ends the exchange with one generic
:class:`~ubicore.errors.AuthenticationFailed`, no pass 4, and the state wiped. An unknown
user gets a fake record derived from a server secret, handled identically, so pass 2
never tells which accounts exist.

This module is sans-IO: messages in, messages out. Which process runs it, how its
messages are framed and how failed guesses are counted is the caller's business
(:mod:`ubicore.security.guard`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from ..errors import AuthenticationFailed, CredentialsError, DecryptionFailed, UbiError
from . import primitives as P
from .primitives import DEFAULT_KDF, KdfParams, Rng, Secret

SUITE = "AMP-E25519-SHA256-A2id-v1"
SALT_BYTES = 16
MAX_USER_BYTES = 256

__all__ = [
    "SUITE",
    "Challenge",
    "ClientHandshake",
    "Confirm",
    "CredentialsOutOfDate",
    "Grant",
    "Hello",
    "PasswordSecret",
    "ScalarSecret",
    "ServerHandshake",
    "UserSecret",
    "VerifierRecord",
    "fake_record",
    "make_verifier",
    "password_scalar",
]


class CredentialsOutOfDate(CredentialsError):
    """Raised when cached credentials were derived for another salt or Argon2 cost than the
    site now holds (the password was changed). Cache them again."""

    def __init__(self, message: str = "cached credentials are out of date") -> None:
        super().__init__(message)


# --- records and messages ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifierRecord:
    """What the server stores for a user: never the password, never π."""

    user: str
    salt: bytes
    params: KdfParams
    verifier: bytes = field(repr=False)  # V: not password-equivalent, but it feeds offline guessing

    def __repr__(self) -> str:
        return f"VerifierRecord(user={self.user!r}, params={self.params!r}, verifier=<redacted>)"


@dataclass(frozen=True, slots=True)
class Hello:
    """Pass 1."""

    user: str
    g1: bytes


@dataclass(frozen=True, slots=True)
class Challenge:
    """Pass 2: nothing in it depends on a key."""

    g2: bytes
    salt: bytes
    params: KdfParams


@dataclass(frozen=True, slots=True)
class Confirm:
    """Pass 3."""

    h_c: bytes


@dataclass(frozen=True, slots=True)
class Grant:
    """Pass 4: the server's confirmation and the data keys sealed under K_wrap.
    ``version`` (the key-set version) is sent in the clear and bound into the seal."""

    h_s: bytes
    nonce: bytes
    wrapped: bytes
    version: int


@dataclass(frozen=True, slots=True)
class ExchangeKeys:
    """What both sides derive; ``session`` (K_sess) is what survives the exchange."""

    confirm_client: Secret
    confirm_server: Secret
    wrap: Secret
    session: Secret
    transcript_hash: bytes


# --- deriving π -------------------------------------------------------------------------------


def _check_user(user: str) -> bytes:
    raw = user.encode("utf-8") if isinstance(user, str) else b""
    if not raw or len(raw) > MAX_USER_BYTES:
        raise ValueError(f"a user name is 1..{MAX_USER_BYTES} UTF-8 bytes")
    return raw


def password_scalar(password: str, user: str, site: str, salt: bytes, params: KdfParams) -> Secret:
    """π = Argon2id(password, salt, params, 64 bytes, ad = lp(suite, user, site)) mod L."""
    w = P.argon2id(password.encode("utf-8"), salt, params, P.lp(SUITE, user, site))
    pi = P.scalar_reduce(w.value)
    if P.scalar_is_zero(pi):
        raise P.DegenerateScalar("degenerate password scalar")
    return Secret(pi)


def make_verifier(
    user: str, site: str, password: str, params: KdfParams = DEFAULT_KDF, *, rng: Rng = os.urandom
) -> VerifierRecord:
    """A new verifier record with a fresh salt (registration)."""
    _check_user(user)
    salt = rng(SALT_BYTES)
    pi = password_scalar(password, user, site, salt, params)
    return VerifierRecord(user, salt, params, P.base_mul(pi.value))


def fake_record(server_secret: Secret, user: str, params: KdfParams = DEFAULT_KDF) -> VerifierRecord:
    """The stand-in record for an unknown user: stable per name, indistinguishable in form."""
    okm = P.hkdf(server_secret.value, b"", P.lp("ubicore fake verifier", user), SALT_BYTES + 64)
    pi = P.scalar_reduce(okm[SALT_BYTES:])
    return VerifierRecord(user, okm[:SALT_BYTES], params, P.base_mul(pi))


class UserSecret:
    """What a client proves: a password, or a cached π for one salt and cost."""

    def scalar(self, user: str, site: str, salt: bytes, params: KdfParams) -> Secret:
        raise NotImplementedError

    def ready(self, user: str, site: str, salt: bytes, params: KdfParams) -> bool:
        """True if :meth:`scalar` returns at once (no password KDF to run)."""
        return False


class PasswordSecret(UserSecret):
    """A password; π is derived once per (salt, params) and kept in memory."""

    __slots__ = ("_password", "_cache")

    def __init__(self, password: str) -> None:
        self._password = password
        self._cache: dict[tuple[str, str, bytes, KdfParams], Secret] = {}

    def scalar(self, user: str, site: str, salt: bytes, params: KdfParams) -> Secret:
        key = (user, site, salt, params)
        pi = self._cache.get(key)
        if pi is None:
            pi = self._cache[key] = password_scalar(self._password, user, site, salt, params.check())
        return pi

    def ready(self, user: str, site: str, salt: bytes, params: KdfParams) -> bool:
        return (user, site, salt, params) in self._cache

    def __repr__(self) -> str:
        return "<PasswordSecret redacted>"


class ScalarSecret(UserSecret):
    """A cached π with the salt and cost it was derived for (``credentials.dat``)."""

    __slots__ = ("_pi", "salt", "params")

    def __init__(self, pi: Secret, salt: bytes, params: KdfParams) -> None:
        self._pi, self.salt, self.params = pi, salt, params

    def scalar(self, user: str, site: str, salt: bytes, params: KdfParams) -> Secret:
        if not P.ct_equal(salt, self.salt) or params != self.params:
            raise CredentialsOutOfDate()
        return self._pi

    def ready(self, user: str, site: str, salt: bytes, params: KdfParams) -> bool:
        return True

    def __repr__(self) -> str:
        return "<ScalarSecret redacted>"


# --- the transcript and key schedule ---------------------------------------------------------


def _tt1(user: str, site: str, salt: bytes, params: KdfParams, g1: bytes) -> bytes:
    return P.lp(SUITE, user, site, salt, params.encode(), g1)


def _derive(shared: bytes, tt: bytes, site: str) -> ExchangeKeys:
    th = P.sha256(tt)
    prk = P.hkdf_extract(th, shared)
    okm = P.hkdf_expand(prk, b"AMP-v1 keys" + P.lp(SUITE, site), 64)
    return ExchangeKeys(Secret(okm[:16]), Secret(okm[16:32]), Secret(okm[32:48]), Secret(okm[48:64]), th)


def _client_mac(keys: ExchangeKeys) -> bytes:
    return P.hmac_sha256(keys.confirm_client.value, b"AMP client confirm" + keys.transcript_hash)


def _server_mac(keys: ExchangeKeys) -> bytes:
    return P.hmac_sha256(keys.confirm_server.value, b"AMP server confirm" + keys.transcript_hash)


def _delivery_ad(keys: ExchangeKeys, context: bytes, version: int) -> bytes:
    return P.lp("AMP-v1 keydelivery", keys.transcript_hash, context, struct.pack(">Q", version))


# --- the two sides ------------------------------------------------------------------------------


class _Failed(Exception):
    pass


class ClientHandshake:
    """The client's side of one exchange. ``start`` → Hello, ``respond`` → Confirm,
    ``finish`` → the delivered key material. Any failure raises AuthenticationFailed (or
    CredentialsOutOfDate) and leaves the object unusable."""

    def __init__(self, user: str, site: str | None, secret: UserSecret, *, rng: Rng = os.urandom) -> None:
        """``site`` None: take the site name the server states in pass 2 (``respond``);
        a false one changes the transcript and fails the confirmation."""
        _check_user(user)
        self.user = user
        self.site = site
        self._secret = secret
        self._rng = rng
        self._x: Secret | None = None
        self._g1 = b""
        self._keys: ExchangeKeys | None = None
        self._state = "new"

    def __repr__(self) -> str:
        return f"<ClientHandshake user={self.user!r} site={self.site!r} state={self._state}>"

    def start(self) -> Hello:
        if self._state != "new":
            raise RuntimeError("a handshake starts once")
        try:
            x = P.random_scalar(self._rng)
            self._g1 = P.base_mul(x)
        except UbiError:
            self._fail()
        self._x = Secret(x)
        self._state = "started"
        return Hello(self.user, self._g1)

    def respond(self, ch: Challenge, site: str | None = None) -> Confirm:
        if self._state != "started" or self._x is None:
            raise RuntimeError("respond follows start, once")
        if self.site is None:
            if site is None:
                raise ValueError("the site name is needed to respond")
            self.site = site
        try:
            g2 = P.check_point(ch.g2)
            if type(ch.salt) is not bytes or len(ch.salt) != SALT_BYTES or not isinstance(ch.params, KdfParams):
                raise _Failed
            site = self.site
            pi = self._secret.scalar(self.user, site, ch.salt, ch.params.check()).value
            tt1 = _tt1(self.user, site, ch.salt, ch.params, self._g1)
            tt = P.lp(tt1, g2)
            e1 = P.hash_to_scalar("e1", tt1)
            e2 = P.hash_to_scalar("e2", tt)
            x = self._x.value
            d = P.nonzero(P.scalar_add(P.scalar_mul(x, e1), pi))
            omega = P.scalar_mul(P.scalar_invert(d), P.scalar_add(x, e2))
            alpha = P.point_mul(omega, g2)
            self._keys = _derive(alpha, tt, site)
        except CredentialsOutOfDate:
            self._wipe()
            raise
        except (UbiError, ValueError, TypeError, _Failed):
            self._fail()
        self._x = None
        self._state = "confirmed"
        assert self._keys is not None
        return Confirm(_client_mac(self._keys))

    def finish(self, grant: Grant, context: bytes) -> tuple[bytes, Secret]:
        """Check H_S, then open the delivered keys; (key material, K_sess)."""
        keys = self._keys
        if self._state != "confirmed" or keys is None:
            raise RuntimeError("finish follows respond, once")
        try:
            if type(grant.h_s) is not bytes or not P.ct_equal(grant.h_s, _server_mac(keys)):
                raise _Failed
            if type(grant.nonce) is not bytes or len(grant.nonce) != P.GCM_NONCE_BYTES:
                raise _Failed
            aead = P.Aead(keys.wrap)
            payload = aead.open(grant.nonce, grant.wrapped, _delivery_ad(keys, context, grant.version))
        except (_Failed, DecryptionFailed, TypeError, ValueError, struct.error):  # struct: a bad version
            self._fail()
        self._keys = None
        self._state = "done"
        return payload, keys.session

    def _wipe(self) -> None:
        self._x = None
        self._keys = None
        self._state = "failed"

    def _fail(self) -> NoReturn:
        self._wipe()
        raise AuthenticationFailed("authentication failed")


class ServerHandshake:
    """The server's side of one exchange: ``challenge`` (pass 2), ``confirm`` (checks pass
    3), ``grant`` (pass 4, only after a good confirm). One-shot: a second pass 3 is refused.

    ``lookup(user)`` returns the user's record or None; None gets the fake record, and the
    exchange then fails at confirmation like a wrong password.
    """

    def __init__(
        self,
        site: str,
        lookup: Callable[[str], VerifierRecord | None],
        server_secret: Secret,
        *,
        fake_params: KdfParams = DEFAULT_KDF,
        rng: Rng = os.urandom,
    ) -> None:
        self.site = site
        self._lookup = lookup
        self._server_secret = server_secret
        self._fake_params = fake_params
        self._rng = rng
        self._y: Secret | None = None
        self._tt1 = b""
        self._g1 = b""
        self._g2 = b""
        self._keys: ExchangeKeys | None = None
        self.user = ""
        self.known_user = False
        self.record_verifier = b""
        self._state = "new"

    def __repr__(self) -> str:
        return f"<ServerHandshake user={self.user!r} state={self._state}>"

    @property
    def state(self) -> str:
        return self._state

    def challenge(self, hello: Hello) -> Challenge:
        if self._state != "new":
            raise RuntimeError("one challenge per exchange")
        self._state = "challenged"
        try:
            _check_user(hello.user)
            self.user = hello.user
            fake = fake_record(self._server_secret, hello.user, self._fake_params)  # made for known users
            record = self._lookup(hello.user)  # too, so that pass 2 takes as long either way
            self.known_user = record is not None
            self.record_verifier = b"" if record is None else record.verifier  # which password the login proves
            if record is None:
                record = fake
            g1 = P.check_point(hello.g1)
            tt1 = _tt1(hello.user, self.site, record.salt, record.params, g1)
            e1 = P.hash_to_scalar("e1", tt1)
            m = P.point_add(P.point_mul(e1, g1), record.verifier)  # refuses the identity
            y = P.random_scalar(self._rng)
            g2 = P.point_mul(y, m)
        except (UbiError, ValueError, TypeError):
            self._fail()
        self._y, self._tt1, self._g1, self._g2 = Secret(y), tt1, g1, g2
        return Challenge(g2, record.salt, record.params)

    def confirm(self, confirm: Confirm) -> None:
        """Check H_C. A mismatch raises AuthenticationFailed (one failed guess) and wipes."""
        if self._state != "challenged" or self._y is None:
            self._fail()  # a second pass 3, or a pass 3 without pass 2
        try:
            tt = P.lp(self._tt1, self._g2)
            e2 = P.hash_to_scalar("e2", tt)
            beta = P.point_mul(self._y.value, P.point_add(self._g1, P.base_mul(e2)))
            keys = _derive(beta, tt, self.site)
            self._y = None
            if type(confirm.h_c) is not bytes or not P.ct_equal(confirm.h_c, _client_mac(keys)):
                raise _Failed
        except (UbiError, ValueError, TypeError, _Failed):
            self._fail()
        self._keys = keys
        self._state = "confirmed"

    def grant(self, payload: bytes, context: bytes, version: int) -> tuple[Grant, Secret]:
        """Pass 4: H_S and ``payload`` sealed under K_wrap, bound to ``context`` and
        ``version``; with K_sess. Only after a successful :meth:`confirm`."""
        keys = self._keys
        if self._state != "confirmed" or keys is None:
            raise RuntimeError("grant only after a successful confirm")
        nonce = self._rng(P.GCM_NONCE_BYTES)
        wrapped = P.Aead(keys.wrap).seal(nonce, payload, _delivery_ad(keys, context, version))
        self._keys = None
        self._state = "done"
        return Grant(_server_mac(keys), nonce, wrapped, version), keys.session

    def _fail(self) -> NoReturn:
        self._y = None
        self._keys = None
        self._state = "failed"
        raise AuthenticationFailed("authentication failed")



