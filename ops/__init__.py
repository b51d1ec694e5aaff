"""Operator tooling that both ``make`` targets and the tests use (never imported by app/)."""
