"""modelfleet.agent: the on-device agent."""
