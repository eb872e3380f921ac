"""Replay service: shard storage, rate limiting, snapshots and the shards as Ray actors."""
