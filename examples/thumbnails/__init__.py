"""The thumbnails example: an HTTP API that enqueues image jobs, and the worker that runs them.

``python -m examples.thumbnails.api`` serves the API; ``brokerjobs worker
examples.thumbnails.worker:app`` runs the jobs. See README.md in this folder.
"""
