"""Benchmarks (not tests): ``python -m bench.run [--quick]`` for the serving engine,
``python -m bench.train_bench`` for training."""
