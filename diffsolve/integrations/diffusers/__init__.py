"""diffusers integration.

Scheduler mode (:mod:`.scheduler`): every fixed-grid solver as a drop-in scheduler,

    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver="dpmpp-2m")

Driver mode (:mod:`.pipelines`): any solver (adaptive, Denoising-MCMC and reversible included) on a
pipeline's denoiser and conditioning, ``sample_pipeline`` / ``invert_pipeline``.
"""

from .config import PREDICTIONS, flow_shift
from .pipelines import PipelineOutput, invert_pipeline, pipeline_model, sample_pipeline
from .scheduler import DiffsolveScheduler, DiffsolveSchedulerOutput

__all__ = [
    "PREDICTIONS",
    "DiffsolveScheduler",
    "DiffsolveSchedulerOutput",
    "PipelineOutput",
    "flow_shift",
    "invert_pipeline",
    "pipeline_model",
    "sample_pipeline",
]
