"""Fixed-grid ODE solvers in the model's own variables: Euler and Heun (k-diffusion's, stepping in sigma),
DDIM, DPM-Solver-2 (dpm-2), the linear multistep solvers LMS, iPNDM and iPNDM-v, PNDM / PLMS (pndm), ComfyUI's
RES multistep and gradient estimation (res), and Heun++ (heunpp)."""

from . import ddim, dpm2, euler_heun, heunpp, multistep, pndm, res  # noqa: F401
