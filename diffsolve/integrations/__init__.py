"""Integrations with other libraries (imported on demand: ``diffsolve.integrations.diffusers``)."""
