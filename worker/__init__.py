"""A database job worker pool: one SQLAlchemy Session per job, transient errors retried.

Job authors need only `Session`: inside a job, `Session()` (or the old global
style, `Session.query(...)`) is that job's own Session.

Nothing heavy is imported here: the public names are resolved on first access
(PEP 562), so that `import worker` (and a one-shot run from cron) stays cheap.
"""
__all__ = ["Session", "JobResult", "Outcome"]

_WHERE = {"Session": "db", "JobResult": "runner", "Outcome": "runner"}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
