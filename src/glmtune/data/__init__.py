"""Data: files -> samples (messages) -> (ids, labels) -> batches: ``readers``, ``encode``, ``collate``, ``cache``,
``inspect``, ``command`` (``glmtune data``). Import the submodules; this package imports nothing (fast CLI start)."""
