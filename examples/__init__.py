"""The examples, each run as a script: `python examples/NAME.py`.

A package only so that the benchmarks can import `examples._shared` (the
digits split, the batch order and the BLAS thread limit they share with the
examples) from the repository root.
"""
