"""Benchmarks of langchain-gemma-mtp against transformers, run from the repository root as modules
(`python -m benchmarks.engine_bench --help`); results in benchmarks/results/, read in docs/benchmarks.md."""
