"""Guidance and inverse-problem hooks.

Model wrappers (take a DiffusionModel, return one; every solver can use them, except CFG++: ddim / ddpm):
:class:`ClassifierFreeGuidance`, :class:`CFGPlusPlus`, :class:`ClassifierGuidance`, :class:`DPS` (with
:class:`Masked`, an inpainting operator that subsets a per-sample mask to the rows it is given).

Step hooks (act on the state between solver steps; pass a list to ``ds.sample(..., hooks=[...])``):
:class:`EnKG`, :class:`Inpaint`, :class:`Threshold`.

Optimising the source noise through the sampler: :func:`dflow` (D-Flow), by default with
:func:`.lbfgs.minimise_per_sample` (torch's L-BFGS run on each sample as its own problem, the
samples' evaluations batched).

Inverse problems (:func:`inverse_problem`, :func:`restore`): inpainting and deblurring with DPS,
EnKG or Inpaint, as ``diffsolve restore`` runs them.
"""

from .dflow import DFlowResult, dflow
from .hooks import EnKG, HookContext, Inpaint, StepHook, Threshold
from .tasks import InverseProblem, inverse_problem, restore
from .wrappers import DPS, CFGPlusPlus, ClassifierFreeGuidance, ClassifierGuidance, GuidedModel, Masked

__all__ = [
    "DPS",
    "CFGPlusPlus",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "DFlowResult",
    "EnKG",
    "GuidedModel",
    "HookContext",
    "Inpaint",
    "InverseProblem",
    "Masked",
    "StepHook",
    "Threshold",
    "dflow",
    "inverse_problem",
    "restore",
]
