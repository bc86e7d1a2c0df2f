"""kfac-jax side by side: its adaptive K-FAC on the autoencoder, in its own environment.

`launcher` makes the pinned environment (`requirements.txt`) and runs
`runner` in it as a subprocess; the autoencoder and large-batch benchmarks
call `run` after their own runs.
"""

from benchmarks.kfac_jax.launcher import interpreter, run, setup

__all__ = ["interpreter", "run", "setup"]
