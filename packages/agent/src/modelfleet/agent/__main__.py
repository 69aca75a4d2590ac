"""Run the device agent: `python -m modelfleet.agent run --config FILE`."""

from .cli import main

raise SystemExit(main())
