"""Backups: policy, targets, the manager that writes, verifies, prunes and restores, and its thread and API."""
