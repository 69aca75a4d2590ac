"""Scoring server speed: req/s and p50/p99 at concurrency 1/8/32 on the digits ONNX model.

    .venv/bin/python benchmarks/scoring.py [--duration 5] [--pin] [--skip-azml] [--workers 1,2]

Prints, from one run on this machine: raw in-process onnxruntime throughput
(the ceiling), then the modelfleet server in no-code mode and with an Azure ML
style score.py, then azmlinfsrv serving the same score.py when it is installed
(looked for in .cache/azmlinfsrv-venv; create it with
`uv venv .cache/azmlinfsrv-venv --python 3.11 && uv pip install --compile-bytecode --python
.cache/azmlinfsrv-venv/bin/python azureml-inference-server-http onnxruntime "numpy<2"`).
Also start-up time (process start to ready; the median of `--starts` starts) and
RSS after the load. `--workers N` serves the modelfleet rows with `serve --workers
N` (a comma list measures each count in the same run; start-up then waits for
every worker, and RSS sums the parent and its workers, shared pages counted in
each). Both venvs should hold bytecode (.pyc), as installed
packages do: without it each start compiles NumPy & co. from source (a warning
is printed).
Load comes from `wrk` (apt-get install wrk). Other work on the machine skews
figures: compare rows of the same run only, and run it more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AZML = ROOT / ".cache" / "azmlinfsrv-venv" / "bin" / "azmlinfsrv"
CONCURRENCY = (1, 8, 32)

SCORE_PY = '''\
import json
import os

import numpy as np
import onnxruntime

session = None


def init():
    global session
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.onnx"), opts,
        providers=["CPUExecutionProvider"],
    )


def run(raw_data):
    data = np.array(json.loads(raw_data)["data"], dtype=np.float32)
    label, probabilities = session.run(None, {"X": data})
    return {"label": label.tolist(), "probabilities": probabilities.tolist()}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    total = 0
    # the server and any worker children
    pids = [pid] + [int(p) for p in _children(pid)]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size of the server and its workers: shared pages split between them."""
    total = 0
    for p in [pid] + [int(c) for c in _children(pid)]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def ceiling(model: Path, row: list[float], seconds: float) -> dict[str, float]:
    """In-process throughput: bare session.run, and decode + run + encode with orjson."""
    import onnxruntime as ort
    import orjson

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    x = np.asarray([row], dtype=np.float32)
    body = orjson.dumps({"data": [row]})
    out: dict[str, float] = {}
    for name in ("ort_run", "json_ort_json"):
        n = 0
        end = time.perf_counter() + seconds
        t0 = time.perf_counter()
        while time.perf_counter() < end:
            for _ in range(200):
                if name == "ort_run":
                    sess.run(None, {"X": x})
                else:
                    data = np.asarray(orjson.loads(body)["data"], dtype=np.float32)
                    label, probs = sess.run(None, {"X": data})
                    orjson.dumps({"label": label, "probabilities": probs}, option=orjson.OPT_SERIALIZE_NUMPY)
            n += 200
        out[name] = n / (time.perf_counter() - t0)
    return out


def start(cmd: list[str], env: dict[str, str], port: int, ready_path: str, pin: str | None,
          workers: int = 1) -> tuple[subprocess.Popen[bytes], float]:
    """Start a server; (process, seconds until ready, with `workers` > 1 until every worker logged ready)."""
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    # stderr to a file, not a pipe nobody reads: a server logging per request would fill it and stall
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        url = f"http://127.0.0.1:{port}{ready_path}"
        deadline = t0 + 60
        with httpx.Client(timeout=1) as client:
            while time.perf_counter() < deadline:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{cmd[0]} exited: {log.read().decode(errors='replace')[-2000:]}")
                try:
                    ready = client.get(url).status_code == 200
                except httpx.HTTPError:
                    ready = False
                # /ready answers once one worker serves; each logs event=ready (INFO)
                if ready and (workers == 1 or _logged(log, "event=ready ") >= workers):
                    return proc, time.perf_counter() - t0
                time.sleep(0.002)
        proc.kill()
        proc.wait(5)
    raise RuntimeError(f"{cmd} not ready after 60 s")


def _logged(log: IO[bytes], needle: str) -> int:
    # pread: the server writes through the same file offset; moving it would interleave
    fd = log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace").count(needle)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(port: int, lua: Path, connections: int, duration: float, pin: str | None) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s", "--latency",
           "-s", str(lua), f"http://127.0.0.1:{port}/score"]
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        lat[pct] = float(m.group(1)) * _UNIT[m.group(2)] if m else float("nan")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {"rps": rps, "p50_ms": lat["50"], "p99_ms": lat["99"],
            "non2xx": float(bad.group(1)) if bad else 0.0, "socket_errors": 1.0 if errors else 0.0}


def has_bytecode(python: Path) -> bool:
    """Whether the venv of `python` holds compiled NumPy (uv installs without .pyc unless told)."""
    site = python.parent.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    return any((site / "numpy" / "__pycache__").glob("__init__.*.pyc"))


def measure(name: str, cmd: list[str], env: dict[str, str], port: int, ready: str, lua: Path,
            args: argparse.Namespace, check_body: bytes, workers: int = 1) -> dict[str, object]:
    # start-up is the median of several starts: one start varies a lot on a busy machine
    times = []
    for _ in range(max(0, args.starts - 1)):
        proc, startup = start(cmd, env, port, ready, args.server_cpus, workers)
        stop(proc)
        times.append(startup)
    proc, startup = start(cmd, env, port, ready, args.server_cpus, workers)
    startup = statistics.median([*times, startup])
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/score", content=check_body,
                       headers={"content-type": "application/json"})
        assert r.status_code == 200 and "probabilities" in r.json(), r.text
        rows = {c: wrk(port, lua, c, args.duration, args.load_cpus) for c in CONCURRENCY}
        rss = rss_mib(proc.pid)
        pss = pss_mib(proc.pid)
        placement = None
        if ready == "/v2/health/ready":  # ours: where the model ended up being scored
            placement = httpx.get(f"http://127.0.0.1:{port}/v2/models/model").json().get("parameters")
    finally:
        stop(proc)
    return {"name": name, "workers": workers, "startup_s": startup, "rss_mib": rss, "pss_mib": pss, "rows": rows,
            "placement": placement}


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be worker counts like 1 or 1,2, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"must be worker counts of at least 1, got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, wrk on CPU 1")
    parser.add_argument("--skip-azml", action="store_true")
    parser.add_argument("--starts", type=int, default=5, help="starts per server; start-up is their median")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--workers", default="1", type=_worker_counts,
                        help="serve --workers N for the modelfleet rows; a comma list (1,2) measures each")
    args = parser.parse_args()
    args.server_cpus = "0" if args.pin else None
    args.load_cpus = "1" if args.pin else None
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="mf-bench-"))
    try:
        run(args, work)
    finally:  # also when a server fails to start or wrk fails
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    """Build the model and score.py in `work`, measure every server, print the table."""
    sys.path.insert(0, str(ROOT / "packages" / "deployer" / "src"))
    from modelfleet.deployer.samples import digits_rows, make_digits_onnx

    model_dir = work / "model"
    model = make_digits_onnx(model_dir / "model.onnx")
    (work / "score.py").write_text(SCORE_PY)
    row = digits_rows(1)[0]
    body = json.dumps({"data": [row]})
    lua = work / "post.lua"
    lua.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body)}\n"
    )
    print(f"# scoring benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus={os.cpu_count()}  "
          f"body={len(body)} B  wrk {args.duration:g}s per level  "
          f"workers={','.join(map(str, args.workers))}{'  pinned' if args.pin else ''}")
    ceil = ceiling(model, row, 2.0)
    print(f"in-process ceiling: onnxruntime run {ceil['ort_run']:,.0f}/s; "
          f"orjson decode + run + encode {ceil['json_ort_json']:,.0f}/s")

    for python in (ROOT / ".venv" / "bin" / "python", AZML.parent / "python"):
        if python.exists() and not has_bytecode(python):
            print(f"warning: no bytecode in {python.parent.parent} (start-up includes compiling): "
                  "uv sync --frozen --compile-bytecode")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results = []
    py = str(ROOT / ".venv" / "bin" / "python")
    for workers in args.workers:
        # one count of 1: the rows keep their names (comparable with earlier runs)
        suffix = "" if args.workers == [1] else f" w={workers}"
        flags = ["--log-level", "WARNING"] if workers == 1 else ["--workers", str(workers), "--log-level", "INFO"]
        port = free_port()
        results.append(measure(
            "modelfleet no-code" + suffix, [py, "-m", "modelfleet.scoring", "serve", "--model-dir", str(model_dir),
                                            "--port", str(port), *flags],
            env, port, "/v2/health/ready", lua, args, body.encode(), workers))
        port = free_port()
        results.append(measure(
            "modelfleet score.py" + suffix, [py, "-m", "modelfleet.scoring", "serve", "--model-dir", str(model_dir),
                                             "--entry-script", str(work / "score.py"), "--port", str(port), *flags],
            env, port, "/v2/health/ready", lua, args, body.encode(), workers))
    if AZML.exists() and not args.skip_azml:
        port = free_port()
        azml_env = {**env, "AZUREML_MODEL_DIR": str(model_dir)}
        results.append(measure(
            "azmlinfsrv score.py", [str(AZML), "--entry_script", str(work / "score.py"), "--port", str(port)],
            azml_env, port, "/", lua, args, body.encode()))
    else:
        print(f"(azmlinfsrv not found at {AZML}; skipped)")

    print()
    width = max(22, *(len(str(res["name"])) + 1 for res in results))
    header = f"{'server':<{width}}" + "".join(f"{'c=' + str(c) + ' req/s':>13}" for c in CONCURRENCY)
    header += f"{'p50 c=1':>10}{'p99 c=1':>10}{'p50 c=32':>10}{'p99 c=32':>10}{'start-up':>10}{'RSS':>9}"
    print(header)
    for res in results:
        rows = res["rows"]
        assert isinstance(rows, dict)
        line = f"{res['name']:<{width}}" + "".join(f"{rows[c]['rps']:>13,.0f}" for c in CONCURRENCY)
        line += (f"{rows[1]['p50_ms']:>8.3f}ms{rows[1]['p99_ms']:>8.3f}ms"
                 f"{rows[32]['p50_ms']:>8.2f}ms{rows[32]['p99_ms']:>8.2f}ms"
                 f"{res['startup_s']:>9.2f}s{res['rss_mib']:>7.1f}MiB")
        bad = sum(rows[c]["non2xx"] + rows[c]["socket_errors"] for c in CONCURRENCY)
        if bad:
            line += f"  (errors: {bad:.0f})"
        placement = res.get("placement")
        if isinstance(placement, dict):
            line += f"  [{placement.get('placement')}{', moved to the pool' if placement.get('moved_to_pool') else ''}]"
        if res["workers"] != 1:
            line += f"  (PSS {res['pss_mib']:.1f}MiB, RSS counts shared pages in each process)"
        print(line)
    azml_res = [res for res in results if res["name"] == "azmlinfsrv score.py"]
    if azml_res:
        ours, azml = results[0]["rows"], azml_res[0]["rows"]
        assert isinstance(ours, dict) and isinstance(azml, dict)
        ratios = "  ".join(f"c={c}: {ours[c]['rps'] / azml[c]['rps']:.1f}x" for c in CONCURRENCY)
        print(f"\nno-code{'' if args.workers == [1] else f' w={args.workers[0]}'} vs azmlinfsrv: {ratios}")
    # the machine is shared: runs compare by their ratio to the ceiling measured in the same run
    shares = "  ".join(
        f"{res['name']}: {res['rows'][8]['rps'] / ceil['json_ort_json']:.1%}"  # type: ignore[index]
        for res in results if str(res["name"]).startswith("modelfleet")
    )
    print(f"c=8 as a share of the in-process decode + run + encode ceiling: {shares}")
    if len(args.workers) > 1:
        base = args.workers[0]
        for kind in ("no-code", "score.py"):
            by_count = {res["workers"]: res["rows"] for res in results if f"modelfleet {kind}" in str(res["name"])}
            gains = "  ".join(
                f"w={w}: " + " / ".join(
                    f"{rows[c]['rps'] / by_count[base][c]['rps']:.2f}x" for c in CONCURRENCY  # type: ignore[index]
                )
                for w, rows in by_count.items() if w != base
            )
            print(f"{kind} req/s c={'/'.join(map(str, CONCURRENCY))} against w={base}: {gains}")
    if args.json:
        args.json.write_text(json.dumps({"ceiling": ceil, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
