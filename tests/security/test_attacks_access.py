"""Attacks on getting in over real loopback ZeroMQ sockets (issue 3, "How we will know"):
downgrades and logins. The instances are real :func:`~ubicore.testing.site.running_site`
instances; clients are the SDK's; the attackers are the bare sockets of ``attack_support``.
What is checked (numbered as in the issue's list, which test_attacks_wire.py begins):

5. a client cannot get a weaker level than the schema's (clear requests are refused, a
   clear reply cannot complete a sealed call);
6. a wrong password fails without pass 4, like an unknown user;
7. a stolen verifier logs nobody in (the same computation beats the naive variant of
   ``amp_reference``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from ubicore.errors import AuthenticationFailed, AuthenticationRequired, CallTimeout
from ubicore.protocol.codec import (
    HEADER_SEALED_REQUEST,
    encode_error,
    encode_reply,
    encode_sealed_reply,
    parse_client_message,
)
from ubicore.protocol.messages import ErrorReply, Reply, Sealed
from ubicore.security import primitives as P
from ubicore.security.amp import (
    ClientHandshake,
    Confirm,
    Hello,
    PasswordSecret,
)
from ubicore.security.session import (
    ClientSession,
    SessionGrant,
    client_session,
    server_session,
)
from ubicore.testing.site import (
    COUNTER,
    OPERATOR,
    TEST_KDF,
    run_async,
    running_site,
)
from ubicore.transport.rpc import RpcConnection

from .amp_reference import (
    NaiveServer,
    _base,
    _sc,
    attacker_candidates,
    spec_h_c,
    spec_keys,
    spec_tt1,
)
from .attack_support import (
    FULL_COUNTER,
    GUARD_S,
    SECRET_PAYLOAD,
    L,
    _challenge,
    counter_at,
    raw_dealer,
    raw_login,
)

# --- 5. no downgrade --------------------------------------------------------------------------------------


@run_async
async def test_clear_requests_are_refused_where_the_level_needs_a_session(tmp_path: Path) -> None:
    deployments = [counter_at("Site", "full"), counter_at("Zone-A", "update")]
    async with running_site(tmp_path, instances=[(COUNTER, "Site"), (COUNTER, "Zone-A")],
                            extra_deployments=deployments) as rs:
        full, upd = rs.server(COUNTER, "Site"), rs.server(COUNTER, "Zone-A")
        await rs.client.call("Site", COUNTER, "set_value", name="k", value=5, payload=SECRET_PAYLOAD)
        await rs.client.call("Zone-A", COUNTER, "set_value", name="k", value=5)
        async with raw_dealer(upd.rpc_endpoint, COUNTER, "Zone-A") as d:
            before = upd.core.guard.stats.auth_required
            for op, args in (("bump", {"name": "k"}), ("set_value", {"name": "k", "value": 99}),
                             ("remove", {"name": "k"}), ("get", {"name": "k"})):
                rep = await d.request(op, args)
                assert isinstance(rep, ErrorReply) and rep.code == "auth_required", (op, rep)
            assert upd.core.guard.stats.auth_required == before + 4
            # What `update` leaves open stays open (the control).
            rep = await d.request("get_dump")
            assert isinstance(rep, Reply) and rep.result["relations"]["counters"]
        assert await rs.client.call("Zone-A", COUNTER, "get", name="k") == 5
        async with raw_dealer(full.rpc_endpoint) as d:
            for op in ("get_dump", "get_group", "get_keys", "get_stats", "get", "bump"):
                rep = await d.request(op, {"name": "k"} if op in ("get", "bump") else {})
                assert isinstance(rep, ErrorReply) and rep.code == "auth_required", (op, rep)
                assert SECRET_PAYLOAD not in repr(rep)
        assert await rs.client.call("Site", COUNTER, "get", name="k") == 5


def _session_pair() -> tuple[ClientSession, Any]:
    iid = os.urandom(16)
    grant = SessionGrant(os.urandom(16), P.random_key(), P.random_key(), 1, "full", 60.0, "operator")
    k_sess = P.random_key()
    far = time.monotonic() + 60
    return (client_session(COUNTER, "Site", iid, grant, k_sess, far), server_session(COUNTER, "Site", iid, grant, k_sess, far))


@run_async
async def test_a_rogue_instance_cannot_answer_a_sealed_call_in_the_clear() -> None:
    """A ROUTER posing as the instance answers a sealed call with a clear result, a clear
    error and a reply sealed under another session: the caller takes none of them."""
    client_s, server_s = _session_pair()
    _, other_server = _session_pair()
    ctx = zmq.asyncio.Context()
    rogue = ctx.socket(zmq.ROUTER)
    rogue.setsockopt(zmq.LINGER, 0)
    conn: RpcConnection | None = None
    try:
        rogue.bind("tcp://127.0.0.1:0")
        endpoint = rogue.getsockopt_string(zmq.LAST_ENDPOINT)
        conn = RpcConnection(endpoint)

        async def serve(answers: Callable[[int], list[list[bytes]]]) -> None:
            ident, *frames = await rogue.recv_multipart()
            assert bytes(frames[0]) == HEADER_SEALED_REQUEST and b"read_the_secret" not in b"".join(frames)
            msg = parse_client_message(frames)
            assert isinstance(msg, Sealed)
            for reply in answers(msg.corr_id):
                await rogue.send_multipart([ident, *reply])

        def forged(corr: int) -> list[list[bytes]]:
            return [
                encode_reply(corr, 42),
                encode_error(corr, "not_found", "no such counter", {}),
                encode_sealed_reply(other_server.seal_reply(encode_reply(corr, 43), corr)),
            ]

        task = asyncio.create_task(serve(forged))
        with pytest.raises(CallTimeout):
            await conn.call(COUNTER, "Site", "read_the_secret", {"name": "k"}, 0.5, client_s)
        await task
        assert conn.caller.stats.rejected == 3

        # The control: the same path takes a reply sealed under the right session.
        task = asyncio.create_task(serve(lambda c: [encode_sealed_reply(server_s.seal_reply(encode_reply(c, 7), c))]))
        assert await conn.call(COUNTER, "Site", "read_the_secret", {"name": "k"}, GUARD_S, client_s) == 7
        await task
        # A clear auth_required is the one clear answer a sealed call takes (the SDK logs in
        # again; it never carries data).
        task = asyncio.create_task(serve(lambda c: [encode_error(c, "auth_required", "log in", {})]))
        with pytest.raises(AuthenticationRequired):
            await conn.call(COUNTER, "Site", "read_the_secret", {"name": "k"}, GUARD_S, client_s)
        await task
        assert conn.caller.stats.rejected == 3
    finally:
        if conn is not None:
            conn.close()
        rogue.close(0)
        ctx.term()


# --- 6. wrong password, unknown user ---------------------------------------------------------------------


@run_async
async def test_a_wrong_password_fails_without_pass_4_like_an_unknown_user(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        guard = server.core.guard
        async with raw_dealer(server.rpc_endpoint) as d:
            session = await raw_login(d, *OPERATOR)  # the control: the raw login works
            rep = await d.sealed(session, "bump", {"name": "n"})
            assert isinstance(rep, Reply) and rep.result == 1

            challenges = {}
            for user, password in (("operator", "not-the-password"), ("mallory", "anything"),
                                   ("mallory", "anything"), ("default", "x")):
                failures = guard.stats.login_failures
                hs = ClientHandshake(user, None, PasswordSecret(password))
                hello = hs.start()
                rep = await d.request("auth_hello", {"user": user, "g1": hello.g1})
                assert isinstance(rep, Reply)
                ch = rep.result
                challenges.setdefault(user, []).append(ch)
                confirm = hs.respond(_challenge(ch), ch["site"])
                rep = await d.request("auth_confirm", {"hs": ch["hs"], "h_c": confirm.h_c})
                assert isinstance(rep, ErrorReply), rep
                assert (rep.code, rep.message) == ("auth_failed", "authentication failed")
                assert rep.detail == {}
                assert not {"h_s", "keys", "nonce"} & set(rep.detail)
                assert guard.stats.login_failures == failures + 1
                # pass 3 again (a replay into the same exchange): the exchange is gone, and
                # nothing keyed comes back either
                rep = await d.request("auth_confirm", {"hs": ch["hs"], "h_c": confirm.h_c})
                assert isinstance(rep, ErrorReply) and rep.code == "auth_required"
                assert not {"h_s", "keys", "nonce"} & set(rep.detail)
                assert guard.stats.login_failures == failures + 1
        real, fake = challenges["operator"][0], challenges["mallory"][0]
        assert set(real) == set(fake)
        for k in real:
            assert type(real[k]) is type(fake[k])
            if isinstance(real[k], bytes):
                assert len(real[k]) == len(fake[k])
        assert fake["params"] == real["params"] == {"alg": "argon2id", "t": TEST_KDF.t, "p": TEST_KDF.p,
                                                     "m_kib": TEST_KDF.m_kib}
        assert fake["site"] == real["site"] and fake["instance_id"] == real["instance_id"]
        assert fake["salt"] == challenges["mallory"][1]["salt"]  # stable per name
        assert fake["g2"] != challenges["mallory"][1]["g2"]  # but fresh per exchange
        assert P.is_valid_point(fake["g2"]) and P.is_valid_point(real["g2"])
        # The SDK says the same.
        wrong = rs.new_client(user=("operator", "not-the-password"))
        with pytest.raises(AuthenticationFailed):
            await wrong.call("Site", COUNTER, "get", name="n")


# --- 7. a stolen verifier ----------------------------------------------------------------------------------


@run_async
async def test_a_stolen_verifier_logs_nobody_in(tmp_path: Path) -> None:
    # Every attempt here is a failed login of the operator: lockout (DESIGN.md §8, tested
    # in tests/audit) is set out of reach so that each candidate reaches pass 3.
    no_lockout = {"count": 1000, "window_s": 60}
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER,
                            audit={"failed_logins_per_user": no_lockout,
                                   "failed_logins_per_address": no_lockout}) as rs:
        server = rs.server(COUNTER, "Site")
        guard = server.core.guard
        user = OPERATOR[0]
        record = rs.policy.users()[user].record  # what the thief took from the store
        site = rs.site.name
        # Keeping the attack honest: the same computation beats the naive variant (β = [y]G1).
        a = int.from_bytes(os.urandom(32), "little") % L or 1
        naive = NaiveServer(site, record)
        g1 = P.point_mul(_sc(a), record.verifier)
        ch = naive.challenge(Hello(user, g1))
        alpha = attacker_candidates(a, 0, record.verifier, g1, ch, user, site)["naive-win"]
        naive.confirm(Confirm(spec_h_c(spec_keys(alpha, P.lp(spec_tt1(user, site, ch.salt, ch.params, g1), ch.g2), site))))

        failures, logins = guard.stats.login_failures, guard.stats.logins
        attempts = 0
        async with raw_dealer(server.rpc_endpoint) as d:
            for b in (0, int.from_bytes(os.urandom(32), "little") % L):
                for which in ("naive-win", "g2", "plus-e2B", "plus-e2G1", "plus-e2V", "times-1+e2"):
                    a = int.from_bytes(os.urandom(32), "little") % L or 1
                    g1 = P.point_mul(_sc(a), record.verifier)
                    if b:
                        g1 = P.point_add(g1, _base(b))
                    rep = await d.request("auth_hello", {"user": user, "g1": g1})
                    assert isinstance(rep, Reply)
                    ch = _challenge(rep.result)
                    assert ch.salt == record.salt and ch.params == record.params
                    alpha = attacker_candidates(a, b, record.verifier, g1, ch, user, site)[which]
                    keys = spec_keys(alpha, P.lp(spec_tt1(user, site, ch.salt, ch.params, g1), ch.g2), site)
                    rep = await d.request("auth_confirm", {"hs": rep.result["hs"], "h_c": spec_h_c(keys)})
                    assert isinstance(rep, ErrorReply), (b != 0, which, rep)
                    assert (rep.code, rep.message, rep.detail) == ("auth_failed", "authentication failed", {})
                    attempts += 1
        assert guard.stats.login_failures == failures + attempts
        assert guard.stats.logins == logins
