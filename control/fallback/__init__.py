"""Degraded answers: the fallback program, its precomputed answers and the served request contract it enforces."""
