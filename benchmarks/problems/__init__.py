"""The benchmarks `python -m benchmarks` runs: the training problems (autoencoder,
MLP, CNN, transformer LM), the same at large batches, and the weight-sharing
layers' step cost."""
