"""The in-memory peer pairs of ubicore.testing, used as a user's tests would use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ubicore.dispatch import InstanceCore
from ubicore.errors import BadArguments, NotFound
from ubicore.protocol.channel import FollowState
from ubicore.services.configuration import ConfigurationUpdate
from ubicore.services.positions import Positions
from ubicore.store import Store
from ubicore.schema import Protection
from ubicore.testing.peers import ChannelPair, RpcPair


def config_core() -> InstanceCore:
    # The sample's relation is persistent: SQLite's in-memory database stands in for a file.
    # Served open here: these tests are about correlation, not protection.
    return InstanceCore(ConfigurationUpdate, "Site", Store(ConfigurationUpdate, Path(":memory:")),
                        protection=Protection.OPEN)


def test_rpc_pair_round_trips_with_typed_errors() -> None:
    pair = RpcPair(config_core())
    assert pair.call("add_sensor", sensor="S-9", sink="udp://x", rate_hz=2) is None
    assert pair.call("get_sensor", sensor="S-9")["rate_hz"] == 2.0
    with pytest.raises(NotFound):
        pair.call("get_sensor", sensor="nope")
    with pytest.raises(BadArguments):
        pair.call("set_rate", sensor="S-9", rate_hz=0)
    assert pair.call("list_sensors") == ["S-9"]


def test_rpc_pair_deadlines_with_a_hand_driven_clock() -> None:
    pair = RpcPair(config_core())
    corr = pair.send("list_sensors", timeout_s=1.0)
    pair.now = 2.0
    (expired,) = pair.caller.expire(pair.now)
    assert expired.corr_id == corr and isinstance(expired.error, TimeoutError)
    pair.serve()
    assert pair.deliver() == [] and pair.caller.stats.unmatched_replies == 1


def test_channel_pair_heals_a_lossy_channel() -> None:
    core = InstanceCore(Positions, "Zone-A", Store(Positions, None))
    pair = ChannelPair(core)
    rpc = RpcPair(core)
    rpc.call("place", tag="T-1", x=1.0, y=1.0)
    pair.publish()  # committed before the join: in the dump, and dropped as a duplicate
    pair.join()
    assert pair.follower.state is FollowState.LIVE and pair.follower.seq == 1
    for i in range(10):
        rpc.call("place", tag=f"T-{i}", x=float(i), y=0.0)
        pair.publish()
    del pair.wire[3:5]  # two deltas lost past a high-water mark
    pair.heartbeat()
    pair.flow()
    assert pair.dumps == 2 and pair.follower.seq == core.sequencer.seq == 11
    seqs = [b.seq for b in pair.applied]
    assert seqs == sorted(set(seqs))


def test_rpc_pair_logs_in_and_seals_its_calls() -> None:
    from ubicore.errors import AuthenticationFailed, AuthenticationRequired
    from ubicore.security.policy import Right, StaticPolicy
    from ubicore.testing.site import TEST_KDF

    policy = StaticPolicy("site", fake_params=TEST_KDF)
    policy.add_user("op", "pw", Right.UPDATE)
    core = InstanceCore(ConfigurationUpdate, "Site", Store(ConfigurationUpdate, Path(":memory:")), policy=policy)
    pair = RpcPair(core)
    with pytest.raises(AuthenticationRequired):
        pair.call("add_sensor", sensor="S-9", sink="udp://x", rate_hz=2)
    with pytest.raises(AuthenticationFailed):
        pair.login("op", "wrong")
    session = pair.login("op", "pw")
    assert session.user == "op" and session.level == "update"
    assert pair.call("add_sensor", sensor="S-9", sink="udp://x", rate_hz=2) is None
    assert pair.call("list_sensors") == ["S-9"]
    assert core.guard.stats.logins == 1 and core.guard.stats.login_failures == 1
    assert session.tx_counter == 2  # both calls went sealed
