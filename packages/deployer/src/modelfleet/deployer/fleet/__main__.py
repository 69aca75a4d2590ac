"""`python -m modelfleet.deployer.fleet drive NAME`: a detached rollout controller.

`modelfleet fleet rollout create/resume` without `--wait` starts this in the
background; it drives the rollout until it finishes, pauses or is aborted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from modelfleet.deployer.errors import DeployerError
from modelfleet.deployer.fleet.operations import broker_url, drive, open_backend
from modelfleet.deployer.fleet.store import FleetStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelfleet.deployer.fleet")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("drive", help="drive a rollout until it finishes")
    run.add_argument("name")
    run.add_argument("--broker", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    store = FleetStore()
    try:
        rollout = store.get(args.name)
        backend = open_backend(broker_url(args.broker, rollout))
        try:
            final = drive(store, backend, args.name)
        finally:
            backend.close()
    except DeployerError as exc:
        logging.getLogger("modelfleet.fleet").error("event=driver_failed reason=%r", str(exc))
        return 1
    logging.getLogger("modelfleet.fleet").info("event=driver_done state=%s reason=%r", final.state, final.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
