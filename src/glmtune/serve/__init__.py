"""glmtune serve: the OpenAI-compatible HTTP API (``app.py``), its request checks (``schemas.py``), the command."""
