"""Tools for testing llmfx and research code built on it."""
