"""Rollout workers: simulators, the driving task and the acting loop (issue #4)."""
