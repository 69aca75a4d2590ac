"""Client load for the update-under-traffic figures (local and docker targets).

Closed-loop clients post one digits row each; the figures are successful and
failed requests and the longest gap between two successes, which is the time
the service did not answer during an update.
"""

from __future__ import annotations

import json
import threading
import time

import httpx

from modelfleet.deployer.samples import digits_rows


class Load:
    """Closed-loop clients; counts failures and the longest gap between successes."""

    def __init__(self, url: str, key: str, clients: int) -> None:
        self.url, self.key = url, key
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = self.failed = 0
        self.last_ok = time.monotonic()
        self.longest_gap = 0.0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        body = json.dumps({"data": digits_rows(1)}).encode()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    good = client.post(self.url, content=body, headers=headers).status_code == 200
                except httpx.HTTPError:
                    good = False
                    time.sleep(0.01)  # refused connections return at once; do not spin
                now = time.monotonic()
                with self.lock:
                    if good:
                        self.ok += 1
                        self.longest_gap = max(self.longest_gap, now - self.last_ok)
                        self.last_ok = now
                    else:
                        self.failed += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)
