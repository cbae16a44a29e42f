"""Monitoring, one optional part: the observer interface the loop speaks
(`observe`), the `metrics`/`hooks` settings, Prometheus metrics, the HTTP listener
with health and the status page, and the hooks. Importing this package imports
nothing else: the core imports only `observe`, the rest loads when the config asks."""
