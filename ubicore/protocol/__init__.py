"""The sans-IO protocol core: messages, their codec, RPC correlation, channel sequencing.

Nothing here imports ``zmq``: every object is fed frames (``list[bytes]``) and events and
gives back frames and events, so two in-memory peers can talk without sockets.
"""
