"""Driving a solver's generator by hand in the tests: the model answers every query, the calls counted."""

from diffsolve.core.protocol import drive


def run_by_hand(solver, x_T, grid, noise, schedule, model):
    """``solver``'s run from ``x_T`` over ``grid`` with the step noise ``noise``, each query answered
    by ``model(x, t)``: (what the run returns, model calls)."""
    calls = 0

    def call(q):
        nonlocal calls
        calls += 1
        return model(q.x, q.t)

    return drive(solver.run(x_T, grid, noise, schedule=schedule), call), calls
