"""modelfleet.scoring"""
