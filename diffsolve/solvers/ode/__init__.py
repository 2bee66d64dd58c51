"""Fixed-grid ODE solvers in the model's own variables: Euler and Heun (k-diffusion's, stepping in sigma),
DDIM, DPM-Solver-2 (dpm-2), the linear multistep solvers LMS, iPNDM and iPNDM-v, PNDM / PLMS (pndm), ComfyUI's
RES multistep and gradient estimation (res), Heun++ (heunpp), classical RK4 in exponential-integrator variables
(rk4: exp-rk4), and Euler with an AB2 history (ab_history:
ud10-ab, ComfyUI's cfgpp_ud10_ab under CFG++)."""

from . import ab_history, ddim, dpm2, euler_heun, heunpp, multistep, pndm, res, rk4  # noqa: F401
