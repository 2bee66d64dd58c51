"""Thin wrapper: the benchmark lives in diffsolve/bench/ode.py (also `diffsolve bench --only ode`)."""

from diffsolve.bench import script_main

if __name__ == "__main__":
    script_main("ode")
