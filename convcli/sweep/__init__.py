"""Sweeps: many configurations from a TOML spec, run locally, in processes or on Dask."""
