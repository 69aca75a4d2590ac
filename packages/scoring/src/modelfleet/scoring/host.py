"""`ModelHost`: holds the active model version and hot-swaps to a new one without dropping requests.

A new version is loaded beside the active one and warmed up with its sample
request; only then does the active pointer switch. A load that runs longer
than the load timeout is refused (stage "timeout"); Python cannot stop its
thread, so whatever it produces later is closed, never served. Requests hold a reference
(counted) to the version they started on, and a retired version is closed once
its last request finishes. The device agent drives this API directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import ModelLoadError, ScoringError, describe
from .metrics import ScoringMetrics
from .runtimes.base import (
    ENTRY_SCRIPT_RUNTIME,
    NO_CODE_RUNTIMES,
    ModelRuntime,
    Signature,
    runtime_class,
)
from .settings import ServerSettings

log = logging.getLogger("modelfleet.scoring.host")
T = TypeVar("T")

MODEL_SUFFIXES = tuple(NO_CODE_RUNTIMES)
#: fast calls in a row before a pool model moves inline
PROMOTE_AFTER = 64
#: slow inline calls that move a model to the pool (one can be the machine's fault)
DEMOTE_AFTER = 3
#: "slow": an inline call over SLOW_FACTOR x the inline threshold (5 ms by default);
#: DEMOTE_AFTER of them within DEMOTE_RECENT inline calls demote the model
SLOW_FACTOR = 5
DEMOTE_RECENT = 8
#: "very slow": over VERY_SLOW_FACTOR x the threshold (20 ms); DEMOTE_AFTER of them
#: within DEMOTE_WINDOW inline calls demote a model that is only now and then slow
VERY_SLOW_FACTOR = 20
DEMOTE_WINDOW = 1000


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a model folder (or file), an optional entry script, name and version."""

    model_dir: Path
    entry_script: Path | str | None = None
    name: str = "model"
    version: str = "1"


def find_model_file(model_dir: Path) -> Path:
    """The one .onnx/.tflite file of a no-code model folder (the folder may be the file itself)."""
    if model_dir.is_file():
        if model_dir.suffix.lower() in MODEL_SUFFIXES:
            return model_dir
        raise ModelLoadError("load", f"{model_dir} is not an .onnx or .tflite file")
    if not model_dir.is_dir():
        raise ModelLoadError("load", f"model directory not found: {model_dir}")
    found = sorted(p for p in model_dir.iterdir() if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())
    if not found:
        found = sorted(p for p in model_dir.rglob("*") if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())
    if not found:
        raise ModelLoadError(
            "load",
            f"no .onnx or .tflite file in {model_dir} and no entry script given (--entry-script)",
        )
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(model_dir)) for p in found[:5])
        raise ModelLoadError(
            "load", f"{model_dir} holds several models ({names}); give an entry script to choose"
        )
    return found[0]


def resolve_entry_script(entry_script: Path | str, model_dir: Path) -> Path:
    """A relative entry script is looked up in the model folder first, then the working directory."""
    path = Path(entry_script)
    if path.is_absolute():
        return path
    base = model_dir if model_dir.is_dir() else model_dir.parent
    if (base / path).is_file():
        return base / path
    return path.resolve()


def open_runtime(spec: ModelSpec) -> ModelRuntime:
    """The runtime for a spec: entry script if given, else by the model file's suffix."""
    model_dir = Path(spec.model_dir)
    if spec.entry_script:
        if not model_dir.exists():
            raise ModelLoadError("load", f"model directory not found: {model_dir}")
        script = resolve_entry_script(spec.entry_script, model_dir)
        return runtime_class(ENTRY_SCRIPT_RUNTIME)(script, model_dir)  # type: ignore[no-any-return]
    path = find_model_file(model_dir)
    return runtime_class(NO_CODE_RUNTIMES[path.suffix.lower()])(path)  # type: ignore[no-any-return]


class LoadedModel:
    """One loaded, warmed-up model version and the requests currently using it."""

    def __init__(
        self, spec: ModelSpec, runtime: ModelRuntime, warmup_s: float | None, inline_threshold_s: float
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = spec.version
        self.runtime = runtime
        self.warmup_s = warmup_s
        self.loaded_at = time.time()
        # Fast models run inline on the event loop (a thread hop costs 2-3x for a
        # ~10 us model); slow or unmeasured ones go to the thread pool.
        self.inline = warmup_s is not None and warmup_s < inline_threshold_s and not runtime.raw
        self.inline_threshold_s = inline_threshold_s
        # A model without a warm-up sample starts in the pool and moves inline once
        # PROMOTE_AFTER calls in a row ran under the threshold; slow inline calls
        # (observe_inline_call) send it to the pool for good.
        self.pool_only = False
        self._fast_streak = 0
        self._inline_calls = 0
        self._slow_s = SLOW_FACTOR * inline_threshold_s
        self._very_slow_s = VERY_SLOW_FACTOR * inline_threshold_s
        # call numbers of the last DEMOTE_AFTER slow / very slow inline calls
        self._slow_at: deque[int] = deque(maxlen=DEMOTE_AFTER)
        self._very_slow_at: deque[int] = deque(maxlen=DEMOTE_AFTER)
        self._lock = threading.Lock()
        self._inflight = 0
        self._retired = False
        self._closed = False

    @property
    def signature(self) -> Signature:
        return self.runtime.signature()

    def observe_pool_call(self, seconds: float) -> bool:
        """Record a pool call's run time; True when the model just moved inline."""
        if self.pool_only or self.inline:
            return False
        if seconds >= self.inline_threshold_s:
            self._fast_streak = 0
            return False
        self._fast_streak += 1
        if self._fast_streak >= PROMOTE_AFTER:
            self.inline = True
            return True
        return False

    def observe_inline_call(self, seconds: float) -> bool:
        """Record an inline call; True when slow calls just moved the model to the pool.

        An inline call blocks the event loop (health checks, every other request)
        while it runs, and is not covered by the scoring timeout; in the pool it is.
        One slow call is often the machine's fault (this thread preempted on a busy
        host: measured here under load, ~1 call in 20,000 of a 10 us model took
        over 5 ms), so it takes DEMOTE_AFTER slow calls among DEMOTE_RECENT, or
        DEMOTE_AFTER very slow ones among DEMOTE_WINDOW.
        """
        self._inline_calls += 1
        if seconds <= self._slow_s:
            return False
        n = self._inline_calls
        self._slow_at.append(n)
        if seconds > self._very_slow_s:
            self._very_slow_at.append(n)
        if not (
            (len(self._slow_at) == DEMOTE_AFTER and n - self._slow_at[0] < DEMOTE_RECENT)
            or (len(self._very_slow_at) == DEMOTE_AFTER and n - self._very_slow_at[0] < DEMOTE_WINDOW)
        ):
            return False
        self.inline = False
        self.pool_only = True
        return True

    def acquire(self) -> None:
        with self._lock:
            self._inflight += 1

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            close = self._retired and self._inflight == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._inflight == 0
        if close:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.runtime.close()
        except Exception:  # a failing close must not disturb the new version
            log.exception("event=model_close_failed name=%s version=%s", self.name, self.version)
        log.info("event=model_released name=%s version=%s", self.name, self.version)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass(frozen=True)
class Candidate:
    """A version loaded and warmed beside the active one, not serving yet (`ModelHost.prepare`)."""

    model: LoadedModel
    #: os.environ before its init() ran, put back if it is discarded
    environ: dict[str, str]
    started: float


class ModelHost:
    """The active model version of one server; `load()` hot-swaps atomically."""

    def __init__(
        self,
        metrics: ScoringMetrics | None = None,
        *,
        inline_threshold_ms: float = 1.0,
        load_timeout_s: float | None = ServerSettings.load_timeout_s,
    ) -> None:
        self.metrics = metrics or ScoringMetrics()
        self.inline_threshold_s = inline_threshold_ms / 1000.0
        #: a prepare() running longer is refused with stage "timeout"; None: no limit
        self.load_timeout_s = load_timeout_s
        self._active: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._swap_lock = threading.Lock()

    @property
    def active(self) -> LoadedModel | None:
        return self._active

    @property
    def ready(self) -> bool:
        return self._active is not None

    def acquire(self) -> LoadedModel | None:
        """The active version, counted as in use until `release()` is called on it."""
        with self._swap_lock:
            model = self._active
            if model is not None:
                model.acquire()
            return model

    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load, warm up and switch to `spec`; on failure the active version keeps serving."""
        with self._load_lock:
            return self.commit(self.prepare(spec))

    def prepare(self, spec: ModelSpec) -> Candidate:
        """Load and warm up `spec` beside the active version, without switching to it.

        The first phase of a swap that several processes make together (`--workers N`):
        `commit()` or `discard()` the candidate next. The caller serialises swaps.
        """
        started = time.perf_counter()
        # init() runs in this process: a refused version must not leave its
        # AZUREML_MODEL_DIR (or anything its init() set) to the serving one
        environ = dict(os.environ)
        try:
            model = self._prepare_in_time(spec)
        except ModelLoadError as exc:
            _restore_environ(environ)
            self.metrics.load_failures += 1
            log.warning(
                "event=model_refused name=%s version=%s stage=%s reason=%r",
                spec.name, spec.version, exc.stage, exc.reason,
            )
            raise
        return Candidate(model, environ, started)

    def commit(self, candidate: Candidate) -> LoadedModel:
        """Switch to a prepared candidate; requests in flight finish on the old version."""
        model = candidate.model
        with self._swap_lock:
            old, self._active = self._active, model
        self.metrics.set_active(model.name, model.version)
        if old is not None:
            old.retire()
        log.info(
            "event=model_active name=%s version=%s platform=%s inline=%s load_ms=%.1f",
            model.name, model.version, model.runtime.platform, model.inline,
            (time.perf_counter() - candidate.started) * 1000,
        )
        return model

    def discard(self, candidate: Candidate) -> None:
        """Drop a prepared candidate (another worker refused it): the active version stays."""
        _restore_environ(candidate.environ)
        log.info("event=model_discarded name=%s version=%s", candidate.model.name, candidate.model.version)
        candidate.model.retire()

    async def aload(self, spec: ModelSpec) -> LoadedModel:
        """`load()` from async code, without blocking the event loop."""
        return await off_loop(self.load, spec)

    def unload(self) -> None:
        """Stop serving (readiness turns false) and release the active version."""
        with self._swap_lock:
            old, self._active = self._active, None
        if old is not None:
            old.retire()

    def _prepare_in_time(self, spec: ModelSpec) -> LoadedModel:
        """`_prepare` on a thread of its own, given up after `load_timeout_s`.

        The thread cannot be stopped: a load that finishes after it was given up
        closes what it loaded itself (`_LoadAttempt.run`), so it never serves.
        """
        if self.load_timeout_s is None:
            return self._prepare(spec)
        attempt = _LoadAttempt(spec)
        thread = threading.Thread(
            target=attempt.run, args=(self._prepare,), name=f"modelfleet-load-{spec.version}", daemon=True
        )
        thread.start()
        if attempt.done.wait(self.load_timeout_s):
            return attempt.outcome()
        if not attempt.give_up():
            return attempt.outcome()  # it finished just now
        log.error(
            "event=model_load_timeout name=%s version=%s timeout_s=%g thread=%s",
            spec.name, spec.version, self.load_timeout_s, thread.name,
        )
        raise ModelLoadError(
            "timeout",
            f"loading version {spec.version} (import, init() and warm-up) did not finish within "
            f"{self.load_timeout_s:g} s (--load-timeout-s); the old version keeps serving, and the "
            "hung load is left running in a background thread and dropped if it ever returns",
        )

    def _prepare(self, spec: ModelSpec, attempt: _LoadAttempt | None = None) -> LoadedModel:
        try:
            runtime = open_runtime(spec)
            if attempt is not None:
                attempt.started(runtime)
            runtime.load()
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError("load", describe(exc)) from exc
        try:
            warmup_s = warm_up(runtime)
        except ScoringError as exc:
            _safe_close(runtime)
            raise ModelLoadError("warmup", str(exc)) from exc
        except Exception as exc:
            _safe_close(runtime)
            raise ModelLoadError("warmup", describe(exc)) from exc
        return LoadedModel(spec, runtime, warmup_s, self.inline_threshold_s)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a daemon thread of its own, awaited.

    Not the loop's default executor: `asyncio.run` joins that one on the way out,
    so a server stopped during a long (or hung) load would not exit until the
    load ended or timed out (up to --load-timeout-s, 300 s by default).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled (the server stopped)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        with suppress(RuntimeError):  # the loop closed meanwhile: nobody awaits it
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=f"modelfleet-{getattr(fn, '__name__', 'load')}", daemon=True).start()
    return await future


class _LoadAttempt:
    """One `prepare()` run on its own thread, which the host may give up waiting for."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.done = threading.Event()
        self.runtime: ModelRuntime | None = None
        self._lock = threading.Lock()
        self._given_up = False
        self._model: LoadedModel | None = None
        self._error: BaseException | None = None

    def run(self, prepare: Any) -> None:
        model: LoadedModel | None = None
        error: BaseException | None = None
        try:
            model = prepare(self.spec, self)
        except BaseException as exc:  # handed to the waiting thread, which raises it
            error = exc
        with self._lock:
            given_up = self._given_up
            self._model, self._error = model, error
            self.done.set()
        if given_up:
            # too late: the host refused this version already and may serve another
            if model is not None:
                model.retire()
            log.warning(
                "event=late_load_dropped name=%s version=%s outcome=%s",
                self.spec.name, self.spec.version, "loaded" if model is not None else describe(error or Exception()),
            )

    def started(self, runtime: ModelRuntime) -> None:
        """The runtime is about to load: known to `give_up()` from here (or refused if too late)."""
        with self._lock:
            self.runtime = runtime
            if self._given_up:
                raise ModelLoadError("timeout", "given up before the load started")

    def give_up(self) -> bool:
        """Stop waiting (the load timed out); False when it finished meanwhile."""
        with self._lock:
            if self.done.is_set():
                return False
            self._given_up = True
            runtime = self.runtime
        abandon = getattr(runtime, "abandon", None)
        if abandon is not None:
            abandon()  # e.g. an entry script's hold on the process environment
        return True

    def outcome(self) -> LoadedModel:
        if self._error is not None:
            raise self._error
        assert self._model is not None
        return self._model


def warm_up(runtime: ModelRuntime) -> float | None:
    """Run the sample request a few times; the median latency in seconds (None: no sample)."""
    sample = runtime.sample()
    if sample is None:
        return None
    timings: list[float] = []
    budget = time.perf_counter() + 0.05
    for _ in range(25):
        t0 = time.perf_counter()
        runtime.predict(sample)
        timings.append(time.perf_counter() - t0)
        if time.perf_counter() > budget and len(timings) >= 3:
            break
    timed = sorted(timings[1:] if len(timings) > 1 else timings)
    return timed[len(timed) // 2]


def _restore_environ(saved: dict[str, str]) -> None:
    """Put os.environ back as it was: drop keys added since, restore changed and removed ones."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _safe_close(runtime: Any) -> None:
    try:
        runtime.close()
    except Exception:
        log.exception("event=runtime_close_failed")
