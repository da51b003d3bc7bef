"""Benchmarks (not tests): see README, Performance."""
