"""`python -m modelfleet.deployer ...`: the `modelfleet` command."""

from modelfleet.deployer.cli import main

main()
