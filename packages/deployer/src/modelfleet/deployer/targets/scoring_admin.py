"""How a target talks to the scoring server it started: the readiness probe
and the admin load request that hot-swaps a model version (contract section 1).

Every target that runs `modelfleet.scoring serve` (a local process, a container)
updates it the same way: load and warm the new version beside the running one,
and let traffic move only once the server answered 200.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import httpx

from modelfleet.deployer.errors import DeploymentError


def is_ready(port: int, *, timeout: float) -> bool:
    """Whether the server on 127.0.0.1:`port` answers `GET /v2/health/ready` with 200."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def error_text(response: httpx.Response) -> str:
    """The server's error body as one line: its message and the stage that failed."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        stage = body.get("stage")
        return f"{body.get('error', body)}" + (f" (stage {stage})" if stage else "")
    return str(body)[:300]


#: how much longer than the server's own load time limit a client waits for its answer, so the
#: server's refusal (stage "timeout", the old version serving) arrives instead of a client time-out
LOAD_ANSWER_GRACE_S = 10.0


def load_timeout_args(timeout: float) -> list[str]:
    """`serve` options that make the server give up on a hung load before a client would."""
    return ["--load-timeout-s", f"{timeout:g}"]


def load_beside(
    port: int,
    admin_key: str,
    model_name: str,
    body: Mapping[str, Any],
    *,
    timeout: float,
    error: type[DeploymentError],
    on_refused: Callable[[], None] | None = None,
) -> None:
    """Load and warm a model version beside the running one; raise `error` unless it now serves.

    `timeout` is the server's load time limit (`load_timeout_args`); the answer is awaited a
    little longer, so a hung load ends as the server's clear refusal, never with the server
    switching after the client gave up.

    `on_refused` runs before the refusal is raised (to drop what was staged for it).
    """
    try:
        response = httpx.post(
            f"http://127.0.0.1:{port}/v2/repository/models/{model_name}/load",
            json=dict(body),
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=timeout + LOAD_ANSWER_GRACE_S,
        )
    except httpx.HTTPError as exc:
        raise error(f"the scoring server did not answer the load request: {exc}") from exc
    if response.status_code != 200:
        if on_refused is not None:
            on_refused()
        raise error(
            f"the new version was refused ({response.status_code}): {error_text(response)}; "
            "the previous version keeps serving"
        )
