"""Job functions: plain `fn(session, **kwargs)`; the worker commits and closes."""
