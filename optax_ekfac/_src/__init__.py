"""The implementation of `optax_ekfac`; import the public names from there.

Along the data flow: `capture` (and `nnx_capture`) record each block's rows
and output gradients as `Statistics`; `kinds/` turn them into rows per layer
kind; `curvature` computes factors, eigenbases, scalings and the
preconditioned gradient; `refresh` keeps the running averages of the state;
`transform` is the optax API; `validation` checks the arguments; `sharding`
the sums over a sharded batch; `diagnostics` inspects the curvature.
"""
