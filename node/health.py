"""What the daemon knows about its own health, shared by its threads: read by /healthz,
/readyz, /metrics and the logs. Plain attributes set by the threads that own them."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Health:
    started_at: float = field(default_factory=time.time)
    #: The worker's model: None while loading, True when loaded, False when it failed.
    model_loaded: bool | None = None
    model_error: str | None = None
    model_identity: dict = field(default_factory=dict)
    #: The inference process was restarted (timeouts, crashes) this many times.
    inference_restarts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def model_ok(self, identity: dict) -> None:
        with self.lock:
            self.model_loaded, self.model_error, self.model_identity = True, None, identity

    def model_failed(self, error: str) -> None:
        with self.lock:
            self.model_loaded, self.model_error = False, error
