"""Orchestration on top of the per-request ring: fan-out with aggregation, chains, OpenAI batches, tasks.

Leaderless: whichever peer receives an orchestration runs it; its state lives at that peer (batches
persist under its data dir). Every part is one ordinary request through EntryService.generate, built
from an OpenAI-shaped body by the same parser the OpenAI routes use (runner.py), so sampling
defaults, chat templates, stop strings and the routing extension behave exactly as there.
"""
