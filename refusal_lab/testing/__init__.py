"""Test support, for this project's tests and benchmarks and for anyone extending it: tiny random-weight
models of any supported architecture built in memory (:mod:`~refusal_lab.testing.tiny`) and the
real-browser helpers that drive the dashboard (:mod:`~refusal_lab.testing.browser`)."""
