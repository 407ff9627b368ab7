"""OpenAI-compatible HTTP server (``infera serve``)."""
