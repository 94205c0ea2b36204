"""The operator console: one page, no build step, every asset served by the service.

The page itself is open (it holds no data); everything it shows comes from the documented
JSON API under the consumer token, which it asks for once and keeps for the tab.
"""

from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("console", __name__)


@bp.route("/console", methods=["GET"])
def console():
    """The console page (README, "The console")."""
    return render_template("console.html")
