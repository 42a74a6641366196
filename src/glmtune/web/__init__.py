"""glmtune web: a chat page in the browser (Gradio) on the same in-process engine as ``glmtune serve``
(``page.py``: the page and its reply logic; ``command.py``: the command)."""
