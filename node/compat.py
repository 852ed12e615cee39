"""Library internals the node relies on, in one place, each with why and the versions it
was checked against (pynetdicom 3.0.4, pydicom 3.0.2, highdicom 0.28.2).

If an upgrade breaks one of these, the tests that exercise it fail; nothing else in the
code reaches into a library's private parts.
"""

from __future__ import annotations

import time


def wait_until_sent(assoc, timeout: float = 30.0) -> None:
    """Block until the association's outgoing PDU queue is empty.

    Why: pynetdicom's DUL reactor (``dul.DULServiceProvider.run_reactor``) sends queued
    PDUs before it reads the socket, so while a C-FIND handler yields answers faster than
    they go out, an incoming C-CANCEL is not even read until every answer is sent, and the
    encoded answers pile up in memory. Waiting here at intervals lets the DUL read what the
    peer sent (the C-CANCEL) and bounds the queue. ``dul.to_provider_queue`` is a plain
    attribute in pynetdicom 2.x and 3.0.x.
    """
    q = getattr(getattr(assoc, "dul", None), "to_provider_queue", None)
    if q is None:
        return
    deadline = time.monotonic() + timeout
    while not q.empty() and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0005)
