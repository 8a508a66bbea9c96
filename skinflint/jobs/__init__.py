"""Deferred requests and passed-through batches, answered through providers' batch APIs: the
background service that sends, polls and records them (:mod:`~skinflint.jobs.service`), what
their results become (:mod:`~skinflint.jobs.settle`), and the OpenAI shapes of the files and
batches API (:mod:`~skinflint.jobs.shapes`)."""

from skinflint.jobs.service import BatchService
from skinflint.jobs.settle import BATCH_STRATEGY, Settler

__all__ = ["BATCH_STRATEGY", "BatchService", "Settler"]
