"""Thin wrapper: the benchmark lives in diffsolve/bench/overhead.py (also `diffsolve bench --only overhead`)."""

from diffsolve.bench import script_main

if __name__ == "__main__":
    script_main("overhead")
