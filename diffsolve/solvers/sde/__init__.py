"""Stochastic fixed-grid solvers: Euler-Maruyama (:mod:`.euler_maruyama`), DDPM and IR-SDE posterior
sampling (:mod:`.ddpm`), Score-SDE's predictor-corrector (:mod:`.pc`), the ancestral samplers of
k-diffusion and ComfyUI (:mod:`.ancestral`) and the consistency-model samplers lcm and tcd
(:mod:`.consistency`), and restart sampling (:mod:`.restart`)."""

from . import ancestral, consistency, ddpm, euler_maruyama, pc, restart  # noqa: F401
