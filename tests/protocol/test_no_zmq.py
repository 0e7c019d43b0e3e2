"""The sans-IO core needs no zmq: it imports and serves a request with zmq blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    '''
    import sys

    class BlockZmq:
        """A meta-path finder that makes every import of zmq fail."""

        def find_spec(self, name, path=None, target=None):
            if name == "zmq" or name.startswith("zmq."):
                raise ImportError(f"zmq is blocked in this test: {name}")
            return None

    assert "zmq" not in sys.modules, "zmq was imported at interpreter start"
    sys.meta_path.insert(0, BlockZmq())
    try:
        import zmq  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not block")

    import ubicore.protocol.codec as codec
    import ubicore.protocol.rpc as rpc
    import ubicore.protocol.channel as channel
    import ubicore.dispatch as dispatch
    import ubicore.store as store
    import ubicore.schema as schema
    import ubicore.security.amp as amp
    import ubicore.security.session as session
    import ubicore.security.guard as guard
    import ubicore.security.policy as policy

    class Counters(schema.Schema, name="NoZmq::Counters"):
        """Named counters."""

        counters = schema.Relation(
            schema.Column("name", str), schema.Column("value", int, default=0), key=("name",)
        )

        @schema.update
        def bump(self, tx, name: str, by: int = 1) -> int:
            row = tx.counters.get(name)
            value = (row.value if row else 0) + by
            tx.counters.upsert(name=name, value=value)
            return value

        @schema.read
        def value(self, tx, name: str) -> int:
            row = tx.counters.get(name)
            return row.value if row else 0

    core = dispatch.InstanceCore(Counters, "Site", store.Store(Counters, None))
    caller = rpc.RpcCaller()
    follower = channel.ChannelFollower()

    corr, frames = caller.start("NoZmq::Counters", "Site", "get_dump", {}, 5.0, 0.0)
    out = caller.receive(core.handle(frames))
    assert out is not None and out.error is None, out
    follower.dump_received(out.result["instance_id"], out.result["seq"])

    for by, expected in ((2, 2), (3, 5)):
        corr, frames = caller.start("NoZmq::Counters", "Site", "bump", {"name": "a", "by": by}, 5.0, 0.0)
        out = caller.receive(core.handle(frames))
        assert out is not None and out.error is None and out.result == expected, out
    corr, frames = caller.start("NoZmq::Counters", "Site", "value", {"name": "a"}, 5.0, 0.0)
    assert caller.receive(core.handle(frames)).result == 5

    corr, frames = caller.start("NoZmq::Counters", "Site", "nope", {}, 5.0, 0.0)
    assert caller.receive(core.handle(frames)).error.code == "not_found"

    delta = core.sequencer.take()
    res = follower.feed(codec.parse_channel_message(codec.encode_delta(delta)))
    assert [b.seq for b in res.batches] == [1, 2] and res.resync is None, res
    assert res.batches[-1].changes[0].row == ("a", 5)

    assert not [m for m in sys.modules if m == "zmq" or m.startswith("zmq.")]
    print("sans-io ok")
    '''
)


def test_the_sans_io_core_runs_without_zmq(tmp_path: Path) -> None:
    # sys.executable is the venv's interpreter (/work/venv/bin/python) under pytest.
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "sans-io ok"
