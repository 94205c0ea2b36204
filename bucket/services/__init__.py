"""Business logic as plain functions, shared by the HTTP views, the CLI and ``flask shell``."""
