"""Metric-gated rollovers and rollbacks of one model's version across a serving pool."""
