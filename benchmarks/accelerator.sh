#!/usr/bin/env bash
# The accelerator command (see benchmarks/README.md): benchmarks/accelerator/run.sh.
exec bash "$(dirname "$0")/accelerator/run.sh" "$@"
