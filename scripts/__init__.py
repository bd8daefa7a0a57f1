"""Data builders, benchmarks and checks of the kit, run from the repository root: `python -m scripts.<name>`."""
