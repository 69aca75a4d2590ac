"""Traffic during an update, for the tests that prove an update fails no request
(`from helpers_traffic import Traffic`): the local target, the docker target and
the device agent all hot-swap under it.

A module of its own, not conftest.py: `from conftest import` would pick
whichever conftest pytest loaded last.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer at all
    version: str | None  # the x-model-version header
    text: str  # the body, or the transport error


class Traffic:
    """Clients posting one JSON body to a scoring URL until stopped; every answer is recorded."""

    def __init__(
        self, url: str, body: Any, *, headers: Mapping[str, str] | None = None, clients: int = 4
    ) -> None:
        self.url = url
        self.content = body if isinstance(body, str | bytes) else json.dumps(body)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self._answers: list[Answer] = []
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def _loop(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(self.url, content=self.content, headers=self.headers)
                    answer = Answer(r.status_code, r.headers.get("x-model-version"), r.text)
                except httpx.HTTPError as exc:
                    answer = Answer(0, None, repr(exc))
                with self.lock:
                    self._answers.append(answer)

    @property
    def answers(self) -> list[Answer]:
        """Every answer so far, in the order they arrived."""
        with self.lock:
            return list(self._answers)

    @property
    def ok(self) -> int:
        return sum(a.status == 200 for a in self.answers)

    @property
    def failures(self) -> list[str]:
        return [f"{a.status} {a.text[:200]}" if a.status else a.text for a in self.answers if a.status != 200]

    @property
    def bodies(self) -> list[str]:
        return [a.text for a in self.answers if a.status == 200]

    @property
    def versions(self) -> set[str | None]:
        return {a.version for a in self.answers if a.status == 200}

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)
