"""Benchmarks of optax_ekfac against Adam, SGD and KFAC; see README.md."""
