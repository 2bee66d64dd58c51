"""Stochastic fixed-grid solvers: Euler-Maruyama (:mod:`.euler_maruyama`), DDPM and IR-SDE posterior
sampling (:mod:`.ddpm`), Score-SDE's predictor-corrector
(:mod:`.pc`), and the ancestral samplers of k-diffusion and ComfyUI (:mod:`.ancestral`)."""

from . import ancestral, ddpm, euler_maruyama, pc  # noqa: F401
