"""A database job worker pool: one SQLAlchemy Session per job, transient errors retried.

Job authors need only `Session`: inside a job, `Session()` (or the old global
style, `Session.query(...)`) is that job's own Session.
"""
from .db import Session
from .runner import JobResult, Outcome

__all__ = ["Session", "JobResult", "Outcome"]
