"""The benchmark suite (``python -m bench``): the service against a trivial ceiling, same run."""
