"""glmtune: fine-tune, evaluate, chat with and export the ChatGLM family."""

__version__ = "0.1.0"
