"""modelfleet.deployer"""
