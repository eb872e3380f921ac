"""Replay service: chunk codec, shard storage, rate limiting (issue #3)."""
