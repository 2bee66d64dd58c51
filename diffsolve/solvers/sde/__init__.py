"""Stochastic fixed-grid solvers: Euler-Maruyama (:mod:`.euler_maruyama`), DDPM and IR-SDE posterior
sampling (:mod:`.ddpm`), Score-SDE's predictor-corrector (:mod:`.pc`), the ancestral samplers of
k-diffusion and ComfyUI (:mod:`.ancestral`) and the consistency-model samplers lcm and tcd
(:mod:`.consistency`), ComfyUI's exponential SDE samplers SEEDS / exp-heun-2-x0 (:mod:`.seeds`) and
ER-SDE (:mod:`.er_sde`), restart sampling (:mod:`.restart`), and k-diffusion's stochastic
DPM-Solver++ family dpmpp-2s-ancestral, dpmpp-sde and dpmpp-3m-sde (:mod:`.dpmpp_sde`)."""

from . import ancestral, consistency, ddpm, dpmpp_sde, er_sde, euler_maruyama, pc, restart, seeds  # noqa: F401
