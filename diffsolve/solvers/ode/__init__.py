"""Fixed-grid ODE solvers in the model's own variables: Euler and Heun (k-diffusion's, stepping in sigma),
DDIM, and the linear multistep solvers LMS, iPNDM and iPNDM-v."""

from . import ddim, euler_heun, multistep  # noqa: F401
