"""Fixed-grid ODE solvers in the model's own variables: Euler and Heun (k-diffusion's, stepping in sigma) and DDIM."""

from . import ddim, dpm2, euler_heun  # noqa: F401
