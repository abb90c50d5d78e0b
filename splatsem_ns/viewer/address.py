"""Where this package's viewers listen: this machine only (127.0.0.1), unless the user opts in to the network.

nerfstudio's default, 0.0.0.0, serves the scene to every network interface: anyone who can reach the machine
can open it. The method configs default to ``LOOPBACK``; ``splatsem-viewer`` does the same for a saved run; a
user who wants the viewer on the network passes ``--viewer.websocket-host 0.0.0.0``, and from another machine
an SSH tunnel (``ssh -L 7007:localhost:7007 HOST``) reaches a loopback viewer without exposing it.
"""

from __future__ import annotations

from typing import Optional, Sequence

LOOPBACK = "127.0.0.1"
"""The address a viewer of this package listens on unless the user opts in to the network."""
HOST_FLAGS = ("--viewer.websocket-host", "--viewer.websocket_host")
"""How a user chooses the viewer's address on the ns-train / ns-viewer / splatsem-viewer command line."""


def exposure_notice(argv: Sequence[str]) -> Optional[str]:
    """A warning for ``ns-viewer`` started without an explicit address, which then listens on every interface
    (it takes its address from its own command line, never from the run's config). None for other commands, or
    when the address was chosen on the command line."""
    if not argv or not str(argv[0]).endswith("ns-viewer"):
        return None
    if any(arg.split("=", 1)[0] in HOST_FLAGS for arg in argv[1:]):
        return None
    return (
        "ns-viewer listens on 0.0.0.0 by default: anyone who can reach this machine on the network can open "
        "the scene. Use `splatsem-viewer` (the same command, on 127.0.0.1 by default) or pass "
        "`--viewer.websocket-host 127.0.0.1`, and reach it from another machine through an SSH tunnel "
        "(`ssh -L 7007:localhost:7007 this-host`)."
    )
