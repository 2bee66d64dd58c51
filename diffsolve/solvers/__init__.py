"""Every registered solver, one sub-package per family of methods (importing it registers them):

- :mod:`.ode`: Euler, Heun (k-diffusion's, in sigma), DDIM;
- :mod:`.exponential`: the exponential integrators (DPM-Solver++ / MR Sampler multistep, the UniPC-type
  predictor-corrector, singlestep and adaptive), on the maths of :mod:`.exponential.maths`;
- :mod:`.sde`: Euler-Maruyama, DDPM / IR-SDE posterior sampling, Score-SDE predictor-corrector;
- :mod:`.adaptive`: adaptive-step solvers (Gotta Go Fast, torchdiffeq's and scipy's RK45);
- :mod:`.reversible`: exactly invertible schemes (reversible Heun, BDIA, O-BELM, EDICT, Rex);
- :mod:`.mcmc`: Denoising MCMC.
"""

from . import adaptive, exponential, mcmc, ode, reversible, sde  # noqa: F401  (registers the solvers)
from .exponential import pilot_grid
from .mcmc import ClassifierNoiseLevel, DenoiserNoiseLevel, ExactNoiseLevel, NoiseLevelEstimator

__all__ = ["ClassifierNoiseLevel", "DenoiserNoiseLevel", "ExactNoiseLevel", "NoiseLevelEstimator", "pilot_grid"]
