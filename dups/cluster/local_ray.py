"""Starting Ray: join a cluster with Ray's own settings, or start one on this machine that
only this machine can reach.

Ray's token authentication is what keeps strangers from running code on a cluster; it is
switched off only for a Ray the project starts for itself, and that one listens on 127.0.0.1
only (Ray's own switch for single-machine use: the loopback address as the node address), with
no dashboard, hence no job API.
"""
from __future__ import annotations

import os
import sys


def init_ray(address: str | None = None, **kwargs) -> None:
    """``ray.init`` joining ``address`` (or ``$RAY_ADDRESS``), else a local Ray on loopback."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is first imported,
        if "ray" in sys.modules:  # and by the node-address lookup at start, if it already was
            import ray._private.ray_constants as constants

            constants.ENABLE_RAY_CLUSTER = False
        kwargs["include_dashboard"] = False
    import ray

    ray.init(address=address or None, **kwargs)
