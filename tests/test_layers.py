"""The package's layers hold (``lint-imports`` in ``make test`` checks ``bucket``'s own modules);
what import-linter cannot see is checked here."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, wherever the statement stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_configuration_imports_nothing_of_the_package():
    """``config.py`` sits below everything (import-linter only takes packages as roots)."""
    assert not {name for name in imported_modules(ROOT / "config.py") if name.startswith("bucket")}


def test_extension_objects_import_nothing_of_the_service():
    """``extensions`` holds unbound objects only: no services, views or HTTP plumbing."""
    upward = ("bucket.services", "bucket.api", "bucket.web", "bucket.schemas", "bucket.models")
    imported = imported_modules(ROOT / "bucket" / "extensions.py")
    assert not {name for name in imported if name.startswith(upward)}
