"""`modelfleet-agent run --config FILE`: parse, start the agent, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from .errors import AgentError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelfleet-agent", description="The modelfleet device agent.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", type=Path, help="TOML config file (env MODELFLEET_AGENT_* overrides it)")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


async def _run(config_path: Path | None) -> None:
    from .agent import Agent
    from .config import load_config

    config = load_config(config_path)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Agent(config).run(stop)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from modelfleet.scoring.footprint import limit_malloc_arenas

    limit_malloc_arenas()
    try:
        asyncio.run(_run(args.config))
    except AgentError as exc:
        if args.debug:
            raise
        print(f"modelfleet-agent: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
