"""DDPM ancestral sampling and IR-SDE's posterior sampling: DDIM with eta = 1
(:class:`~diffsolve.solvers.ode.ddim.DDIM`, whose docstring gives the step), registered here with the
stochastic solvers."""

from __future__ import annotations

from ...core.registry import register
from ..ode.ddim import DDIM

register(
    "ddpm",
    family="sde",
    order=1,
    calls_per_step=1,
    deterministic=False,
    fixed={"eta": 1.0},
    description="DDPM ancestral sampling (DDIM with eta = 1)",
    reference="Ho, Jain & Abbeel 2020, Denoising Diffusion Probabilistic Models",
)(DDIM)
register(
    "irsde-posterior",
    family="sde",
    order=1,
    calls_per_step=1,
    deterministic=False,
    fixed={"eta": 1.0},
    description="IR-SDE optimal-reverse-path posterior step, jump-aware (DDIM with eta = 1 on x - mu)",
    reference="Luo et al. 2023, Image Restoration with Mean-Reverting SDEs; Luo et al. 2024 (DA-CLIP posterior)",
)(DDIM)
