"""The benchmark's parts: implementations, timing, memory, plots, tables.
The command line is `fa2_jax.benchmark`."""
