"""rotator's benchmark suite: `make bench` (or `python -m benchmarks.run`) writes REPORT.md."""
