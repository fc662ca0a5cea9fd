"""Durable state: the SQLite store (desired versions, membership, rollout journal, events) and repository snapshots."""
