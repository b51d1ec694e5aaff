"""Load tests, their verifier and the benchmark (see loadtests/__main__.py and bench.py)."""
