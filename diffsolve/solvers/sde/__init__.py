"""Stochastic fixed-grid solvers: Euler-Maruyama (:mod:`.euler_maruyama`), DDPM and IR-SDE posterior
sampling (:mod:`.ddpm`), Score-SDE's predictor-corrector (:mod:`.pc`), the ancestral samplers of
k-diffusion and ComfyUI (:mod:`.ancestral`), the consistency-model samplers lcm and tcd
(:mod:`.consistency`) and k-diffusion's stochastic DPM-Solver++ family (:mod:`.dpmpp_sde`)."""

from . import ancestral, consistency, ddpm, dpmpp_sde, euler_maruyama, pc  # noqa: F401
