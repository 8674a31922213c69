"""Rollout: applying a plan's actions to the hosts (blue-green, start/stop, remove) and readiness probes."""
