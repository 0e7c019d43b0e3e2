"""The only modules that import ``zmq``: thin asyncio adapters around the sans-IO core.

:mod:`.sockets` pumps frames from a socket into a callback on the event loop,
:mod:`.rpc` turns an :class:`~ubicore.protocol.rpc.RpcCaller` into awaitable calls over
a DEALER socket, and :mod:`.channel` feeds a SUB socket into a callback.
"""
