"""Thin wrapper: the benchmark lives in diffsolve/bench/adaptive.py (also `diffsolve bench --only adaptive`)."""

from diffsolve.bench import script_main

if __name__ == "__main__":
    script_main("adaptive")
