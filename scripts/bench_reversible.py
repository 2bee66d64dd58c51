"""Thin wrapper: the benchmark lives in diffsolve/bench/reversible.py (also `diffsolve bench --only reversible`)."""

from diffsolve.bench import script_main

if __name__ == "__main__":
    script_main("reversible")
