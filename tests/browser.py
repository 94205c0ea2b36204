"""Real-browser tests: Debian's headless Chromium driven by Playwright for Python.

The browser is always the machine's ``/usr/bin/chromium`` (Debian package ``chromium``, which
``.ci/run`` installs); Playwright's own browser download (``playwright install``) is never used.
Without Chromium or the ``playwright`` package, ``launch_chromium`` calls
``servers.unavailable``: the test is skipped on a developer machine and fails in CI.

Typical use in a test module::

    from tests.browser import launch_chromium, open_page, page_log, save_screenshot

    @pytest.fixture(scope="module")
    def browser():
        with launch_chromium() as launched:
            yield launched

    def test_something(browser, request):
        with open_page(browser) as page:
            page.goto("http://localhost:8000/")
            save_screenshot(page, request)
            assert not page.page_errors(), page_log(page)  # no uncaught exception in the page

Every Playwright call has a deadline (``DEFAULT_TIMEOUT_MS`` unless the call gives its own), so a
page that never answers fails the test instead of hanging it. Screenshots go to
``tests/artifacts/`` (ignored by git), named after the test, for a person to look at afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests import servers

if TYPE_CHECKING:
    import pytest
    from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"
# The machine has no network beyond loopback: without the background-networking flags Chromium
# keeps trying (and failing) to reach Google's services. --no-sandbox because CI runs as root.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
DEFAULT_TIMEOUT_MS = 15_000
LAUNCH_TIMEOUT_MS = 30_000
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def chromium_missing() -> str | None:
    """None when Playwright and Debian's Chromium are both installed, else why not."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -r requirements-dev.txt)"
    return None


@contextlib.contextmanager
def launch_chromium(**options: Any) -> Iterator[Browser]:
    """A headless Chromium ``Browser``, closed (with its Playwright driver) on exit.

    ``options`` go to ``chromium.launch`` (``args`` are added to ``CHROMIUM_ARGS``). Skips, or
    fails in CI, when Chromium or Playwright is missing.
    """
    reason = chromium_missing()
    if reason:
        servers.unavailable(reason)
    from playwright.sync_api import sync_playwright

    args = [*CHROMIUM_ARGS, *options.pop("args", ())]
    options.setdefault("timeout", LAUNCH_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=args, **options
        )
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def open_page(browser: Browser, **context_options: Any) -> Iterator[Page]:
    """A page in a fresh browser context (no shared cookies or cache), closed on exit.

    Every Playwright call on it waits at most ``DEFAULT_TIMEOUT_MS`` unless it says otherwise.
    ``context_options`` go to ``browser.new_context``. What the page logged is in
    ``page.console_messages()`` and ``page.page_errors()`` (``page_log`` formats both).
    """
    context = browser.new_context(**context_options)
    try:
        context.set_default_timeout(DEFAULT_TIMEOUT_MS)
        yield context.new_page()
    finally:
        context.close()


def page_log(page: Page) -> str:
    """The page's console messages and uncaught exceptions, one a line, for failure messages."""
    lines = [f"console.{message.type}: {message.text}" for message in page.console_messages()]
    lines += [f"uncaught: {error}" for error in page.page_errors()]
    return "\n".join(lines)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without logging every request to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path, port: int | None = None) -> Iterator[int]:
    """Serve ``directory``'s files over HTTP on 127.0.0.1 from a daemon thread; yield the port.

    Pages load as ``http://localhost:<port>/…`` or ``http://127.0.0.1:<port>/…``: two origins,
    handy for cross-origin tests. The server is shut down and its socket closed on exit.
    """
    port = port or servers.free_port()
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    )
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def artifact_path(request: pytest.FixtureRequest | str, label: str = "", suffix=".png") -> Path:
    """Where an artifact of this test goes: ``tests/artifacts/<module>.<test>[-label]<suffix>``.

    ``request`` is the test's ``request`` fixture (the name comes from its node) or a name.
    """
    if isinstance(request, str):
        name = request
    else:
        module = request.node.module.__name__.rpartition(".")[2] if request.node.module else ""
        name = f"{module}.{request.node.name}" if module else request.node.name
    if label:
        name = f"{name}-{label}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = name.replace("[", "-").replace("]", "")  # parametrized: test_x[sqlite] -> test_x-sqlite
    return ARTIFACTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + suffix)


def save_screenshot(
    page: Page, request: pytest.FixtureRequest | str, label: str = "", full_page: bool = True
) -> Path:
    """Save a PNG of ``page`` into ``tests/artifacts/``, named after the test; return its path."""
    path = artifact_path(request, label)
    page.screenshot(path=str(path), full_page=full_page)
    return path
