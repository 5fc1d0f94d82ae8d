"""Tiny random-weight pipelines built offline, for tests, benchmarks and tutorials."""
