"""The `--workers N` supervisor: a stop that arrives while workers are forked reaches every one of them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Runs a Supervisor whose workers wait for a signal. The SIGTERM is sent to the
# supervisor from inside its first os.fork() call: the moment between forking a
# worker and knowing its pid, and before the second worker exists.
SCRIPT = textwrap.dedent("""
    import os, signal, socket, sys
    from modelfleet.scoring import workers
    from modelfleet.scoring.settings import ServerSettings

    real_fork = os.fork
    forks = 0

    def fork():
        global forks
        forks += 1
        if forks == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_fork()

    os.fork = fork

    def worker_main(settings, sock, control):
        while True:  # until a signal ends it (SIGTERM: the default action)
            signal.pause()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    settings = ServerSettings(model_dir=os.getcwd(), workers=2)
    code = workers.Supervisor(settings, sock, worker_main).run()
    print(f"exit {code} forks {forks}", flush=True)
    sys.exit(code)
""")


def test_stop_during_fork_reaches_the_new_worker_and_no_more_are_forked(tmp_path: Path) -> None:
    script = tmp_path / "supervise.py"
    script.write_text(SCRIPT)
    # without the signal mask around fork the new worker never hears the stop and
    # the supervisor waits for it forever: the timeout turns that into a failure
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exit 0 forks 1" in done.stdout, done.stdout + done.stderr
