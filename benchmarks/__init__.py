"""casfs benchmarks: run from the repository root as modules, e.g. ``python -m benchmarks.bench_tiers``
(``python -m benchmarks.run_all`` runs the default set). See docs/benchmarks.md."""
