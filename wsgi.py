"""WSGI entry point for gunicorn."""

from bucket import create_app

app = create_app()
