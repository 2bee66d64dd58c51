"""Thin wrapper: the benchmark lives in diffsolve/bench/sde.py (also `diffsolve bench --only sde`)."""

from diffsolve.bench import script_main

if __name__ == "__main__":
    script_main("sde")
