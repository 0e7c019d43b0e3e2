"""Local logins: an OS user on the instance's own host, over its ``ipc://`` endpoint.

The kernel says who the peer is (``SO_PEERCRED``, which libzmq hands up as the
connection's ``Peer-Address``, ``…:uid:gid:pid``), so no password is involved: the
instance looks the uid up among the site's OS users. What remains is delivering the
session keys, which an ephemeral X25519 exchange does in one round trip:

    client → ``auth_local {pk: A}``
    server → ``{user, pk: B, nonce, keys: AEAD(K_wrap, grant), version, site, instance_id}``

    tt       = lp("ubicore-local-v1", user, site, context, A, B)
    prk      = HKDF-Extract(salt = SHA-256(tt), X25519(b, A))
    K_wrap ‖ K_sess = HKDF-Expand(prk, "ubicore-local keys", 32)
    keys     = AES-128-GCM(K_wrap, nonce, grant, ad = lp("ubicore-local keydelivery", SHA-256(tt), u64 version))

``context`` is lp(schema, cell, instance id), as in pass 4 of the key exchange; the
grant is the same :class:`~ubicore.security.session.SessionGrant`. The server is known
by the path of its socket: the ipc directory is the site's, mode 0700. Sans-IO.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..errors import AuthenticationFailed, DecryptionFailed, UbiError
from . import primitives as P
from .primitives import Secret

SUITE = "ubicore-local-v1"


@dataclass(frozen=True, slots=True)
class LocalGrant:
    user: str
    pk: bytes
    nonce: bytes
    wrapped: bytes
    version: int


def peer_uid(peer_address: str | None) -> int | None:
    """The uid in an ipc connection's ``Peer-Address`` (``host:uid:gid:pid``), or None."""
    if not peer_address:
        return None
    parts = peer_address.rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        uid = int(parts[1])
    except ValueError:
        return None
    return uid if 0 <= uid < 2**32 else None


def _keys(shared: bytes, user: str, site: str, context: bytes, pk_c: bytes, pk_s: bytes) -> tuple[Secret, Secret, bytes]:
    th = P.sha256(P.lp(SUITE, user, site, context, pk_c, pk_s))
    okm = P.hkdf_expand(P.hkdf_extract(th, shared), b"ubicore-local keys", 32)
    return Secret(okm[:16]), Secret(okm[16:]), th


def _ad(th: bytes, version: int) -> bytes:
    return P.lp("ubicore-local keydelivery", th, struct.pack(">Q", version))


def server_grant(
    user: str, site: str, context: bytes, pk_c: object, payload: bytes, version: int, *, rng: P.Rng = os.urandom
) -> tuple[LocalGrant, Secret]:
    """The server's answer to ``auth_local``: the wrapped grant, and K_sess.
    AuthenticationFailed for a malformed client key."""
    private, pk_s = P.x25519_keypair()
    try:
        shared = P.x25519(private, pk_c)
    except UbiError:
        raise AuthenticationFailed("authentication failed (bad key)") from None
    assert type(pk_c) is bytes
    k_wrap, k_sess, th = _keys(shared, user, site, context, pk_c, pk_s)
    nonce = rng(P.GCM_NONCE_BYTES)
    wrapped = P.Aead(k_wrap).seal(nonce, payload, _ad(th, version))
    return LocalGrant(user, pk_s, nonce, wrapped, version), k_sess


class LocalClient:
    """The client's side: :meth:`start` → the public key to send, :meth:`finish` → the
    grant payload and K_sess. One-shot."""

    def __init__(self) -> None:
        self._private: Secret | None
        self._private, self.pk = P.x25519_keypair()

    def __repr__(self) -> str:
        return "<LocalClient>"

    def finish(self, grant: LocalGrant, site: str, context: bytes) -> tuple[bytes, Secret]:
        private, self._private = self._private, None
        if private is None:
            raise RuntimeError("finish once")
        try:
            if type(grant.user) is not str or type(grant.nonce) is not bytes or len(grant.nonce) != P.GCM_NONCE_BYTES:
                raise ValueError
            shared = P.x25519(private, grant.pk)
            k_wrap, k_sess, th = _keys(shared, grant.user, site, context, self.pk, grant.pk)
            payload = P.Aead(k_wrap).open(grant.nonce, grant.wrapped, _ad(th, grant.version))
        except (UbiError, DecryptionFailed, ValueError, TypeError, struct.error):
            raise AuthenticationFailed("authentication failed") from None
        return payload, k_sess
