"""Denoising MCMC pre-sampling (:mod:`.dmcmc`)."""

from .dmcmc import ClassifierNoiseLevel, DenoiserNoiseLevel, ExactNoiseLevel, NoiseLevelEstimator

__all__ = ["NoiseLevelEstimator", "ExactNoiseLevel", "ClassifierNoiseLevel", "DenoiserNoiseLevel"]
