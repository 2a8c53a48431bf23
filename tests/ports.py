"""Ports for the tests' process groups: distinct within this pytest process, and relaunch on EADDRINUSE.

``socket.bind(0)`` names a port that is free *now*; the worker's rank 0 binds it later, so two worlds launched
together could be handed the same port (the first is not bound yet when the second asks), and another program
(a second pytest, a helper's job) can take it in between. :func:`free_port` never hands out a port twice in one
process; :func:`lost_the_port` tells a world whose rank 0 could not listen, to be launched again on another port.
"""

from __future__ import annotations

import socket

_handed_out: set[int] = set()

#: How many times a world is launched before a port clash counts as a failure.
ATTEMPTS = 4


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def lost_the_port(results: list[tuple[int, str]]) -> bool:
    """Whether a world failed only because its port was taken (rank 0's store could not listen)."""
    return any(code != 0 and ("EADDRINUSE" in err or "address already in use" in err) for code, err in results)
