"""Who holds a claim: a process as a lease holder ("host:pid"), and whether one is gone.

Several processes may share the database (``mammo-node start --role``): a worker claims a
``ready`` exam with ``SELECT ... FOR UPDATE SKIP LOCKED`` and holds it with a lease
(``lease_owner`` = "host:pid", ``lease_until``) that its heartbeat renews; an exam whose lease
ran out (its worker died) is taken over by the next claim (:mod:`storage.exams`). Exporters
claim deliveries the same way (:mod:`storage.deliveries`). Only the lease holder may finish
an exam or a delivery.
"""

from __future__ import annotations

import os
import socket


def process_owner() -> str:
    """This process as a lease holder: "host:pid"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_dead(owner: str | None) -> bool:
    """Whether a lease holder is known to be gone, judged at a process's start (before it
    claims anything): no owner, this very process id (an earlier incarnation: containers
    reuse pids), or a process of this host that no longer runs. Another host's process is
    judged by its lease running out."""
    if not owner:
        return True
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
