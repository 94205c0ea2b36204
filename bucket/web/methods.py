"""HEAD and OPTIONS change nothing: Flask answers HEAD by running the GET view, so a GET that
changes state (``pending`` leases packets) refuses HEAD instead."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import request
from werkzeug.exceptions import MethodNotAllowed


def refuse_head(view: Callable[..., Any]) -> Callable[..., Any]:
    """405 for HEAD on this GET view (its Allow header names GET and OPTIONS), before its
    arguments are read; OPTIONS never reaches a view (Flask answers it from the URL map)."""

    @wraps(view)
    def get_only(*args: Any, **kwargs: Any) -> Any:
        if request.method == "HEAD":
            raise MethodNotAllowed(valid_methods=["GET", "OPTIONS"])
        return view(*args, **kwargs)

    return get_only
