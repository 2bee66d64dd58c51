"""Denoising MCMC pre-sampling (:mod:`.dmcmc`)."""

from .dmcmc import ClassifierNoiseLevel, DenoiserNoiseLevel, ExactNoiseLevel, NoiseLevelEstimator

__all__ = ["ClassifierNoiseLevel", "DenoiserNoiseLevel", "ExactNoiseLevel", "NoiseLevelEstimator"]
