"""Unbound extension objects; the application factory binds them in one place."""

from __future__ import annotations

from flask_cors import CORS
from flask_migrate import Migrate
from flask_smorest import Api
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from bucket.bookkeeper import Bookkeeper
from bucket.queue import QueueService


class Base(DeclarativeBase):
    """Declarative base for the typed models."""


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
api = Api()
cors = CORS()
queue = QueueService()
bookkeeper = Bookkeeper()
