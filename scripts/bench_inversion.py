"""Thin wrapper: the benchmark lives in diffsolve/bench/inversion.py (also `diffsolve bench --only inversion`)."""

from diffsolve.bench import script_main

if __name__ == "__main__":
    script_main("inversion")
