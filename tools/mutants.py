#!/usr/bin/env python3
"""Mutation testing where a silent bug costs most (`make mutants`, docs/mutation.md).

Each group pairs a few source files with the test files that exercise them. A group runs in a
copy of the tracked tree under ``build/mutants/GROUP`` (never in the work tree), with mutmut
configured there: mutmut runs the group's tests once to learn which test calls which function,
then runs each mutant against those tests only, one process at a time.

    python tools/mutants.py run [GROUP ...]      # all groups, smallest first, without names
    python tools/mutants.py run GROUP --mutants GLOB [GLOB ...]  # only these mutants
    python tools/mutants.py summary [GROUP ...]  # scores and surviving mutants of the last runs
    python tools/mutants.py show GROUP MUTANT    # one mutant's diff

Not part of CI: a full run takes tens of minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "mutants"
MUTMUT = Path(sys.executable).parent / "mutmut"

# name: (files to mutate, tests that cover them); smallest first.
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "verify_proof": (
        ["tools/verify_proof.py"],
        ["tests/test_verify_proof.py", "tests/test_audit.py"],
    ),
    "counters": (
        ["bucket/services/counters.py"],
        ["tests/test_counters.py", "tests/test_retention.py", "tests/test_status.py"],
    ),
    "retention": (
        ["bucket/services/retention.py"],
        [
            "tests/test_retention.py",
            "tests/test_counters.py",
            "tests/test_audit.py",
            # purge by days (PostgreSQL): purge_days, drop_day, clear_detached
            "tests/test_partitions.py",
            # key days (PostgreSQL): drop_key_day, live_condition, forget_default_keys
            "tests/test_key_days.py",
            "tests/test_hot_deliveries.py",
        ],
    ),
    "sqlite_turns": (["bucket/sqlite_turns.py"], ["tests/test_sqlite_turns.py"]),
    # The audit trail in two halves, each judged on its own (docs/mutation.md).
    "audit_seal": (
        ["bucket/services/audit/content.py", "bucket/services/audit/sealing.py"],
        [
            "tests/test_audit.py",  # seal_backlog called directly (the periodic thread is not seen)
            "tests/test_audit_content.py",
            # leaf format 2 (leaf_content_v2): seals made between migrations 0008 and 0010
            "tests/test_verify_proof.py::test_an_answer_that_does_not_state_its_leaf_format_is_read_as_format_2",
            "tests/test_ingest_auth.py::test_verify_is_clean_across_the_leaf_format_change",
        ],
    ),
    "audit_verify": (
        [
            "bucket/services/audit/merkle.py",
            "bucket/services/audit/proofs.py",
            "bucket/services/audit/verification.py",
        ],
        [
            "tests/test_audit.py",
            "tests/test_audit_verification.py",
            "tests/test_audit_content.py",
            "tests/test_verify_proof.py",  # artifacts and proofs checked as an outsider would
            # verify across the leaf format change
            "tests/test_ingest_auth.py::test_verify_is_clean_across_the_leaf_format_change",
            "tests/test_uuid_ids.py",  # an artifact asked for by an id that is no uuid: 404
        ],
    ),
    "acks": (
        ["bucket/services/delivery/acks.py"],
        [
            "tests/test_receipts.py",
            "tests/test_consumer.py",
            "tests/test_retries.py",
            "tests/test_counters.py",
            "tests/test_state_machine.py",
            "tests/test_operations.py",  # the per-minute processed figures acks record
            "tests/test_ack_coalescing.py",  # BUCKET_ACK_COALESCE: acknowledge's shared path
            "tests/test_uuid_ids.py",  # ids that are no uuid: not found, never sent to PostgreSQL
        ],
    ),
    "quarantine": (
        ["bucket/services/quarantine.py"],
        [
            "tests/test_quarantine.py",
            "tests/test_quarantine_auth.py",  # outcomes kept, replay under require
            "tests/test_hostile_limits.py",  # eviction by sender
            "tests/test_hostile_operators.py",  # cursors, bodies replay cannot read
            "tests/test_hostile_transport.py",  # bodies nested deeper than the encoders go
            # a refused packet while the database is down: 422, not kept, never a 500
            "tests/test_resilience.py::test_unreachable_database_answers_503_never_2xx",
        ],
    ),
}
# Both backends by default; MUTANTS_BACKENDS=sqlite halves the time (PostgreSQL-only code
# then shows as surviving or untested).
BACKENDS = os.environ.get("MUTANTS_BACKENDS", "sqlite,postgres").split(",")
# Copied beside the mutated tree (the tests start servers from the Procfile and its config).
ALSO_COPY = [
    "bucket",
    "tools",
    "migrations",
    "config.py",
    "wsgi.py",
    "bench",
    "Procfile",
    "gunicorn.conf.py",
]
# Groups whose code never touches the database: their tests run on one backend.
ONE_BACKEND = {"verify_proof": ["sqlite"], "sqlite_turns": ["sqlite"]}


def tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    return [name for name in listed.decode().split("\0") if name]


def prepare(group: str) -> Path:
    """A fresh copy of the tracked tree with the group's mutmut configuration."""
    sources, tests = GROUPS[group]
    where = BUILD / group
    if where.exists():
        shutil.rmtree(where)
    for name in tracked_files():
        target = where / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    # Tests without a backend parameter always run; parametrized ones only on the chosen pair.
    backends = ONE_BACKEND.get(group, BACKENDS)
    others = [b for b in ("sqlite", "postgres") if b not in backends]
    deselect = ["-k", " and ".join(f"not {b}" for b in others)] if others else []
    pyproject = where / "pyproject.toml"
    text = pyproject.read_text()
    text += "\n[tool.mutmut]\n" + "\n".join(
        [
            f"source_paths = {json.dumps(sorted({str(Path(s).parts[0]) for s in sources}))}",
            f"only_mutate = {json.dumps(sources)}",
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
            f"pytest_add_cli_args = {json.dumps(['-p', 'no:cacheprovider', '-q', *deselect])}",
            f"also_copy = {json.dumps(ALSO_COPY)}",
            "mutate_only_covered_lines = false",
        ]
    )
    pyproject.write_text(text + "\n")
    return where


def run(groups: list[str], mutants: list[str] | None = None) -> int:
    """Run each group in turn (one mutant at a time: the machine is shared). ``mutants``:
    mutmut names or globs (``bucket.services.audit.proofs.x_artifact__mutmut_*``) to run only
    those, e.g. the functions a change touched; the others stay "not checked"."""
    failed = 0
    for group in groups:
        where = prepare(group)
        print(f"== {group}: mutating {', '.join(GROUPS[group][0])}", flush=True)
        command = [str(MUTMUT), "run", "--max-children", "1", *(mutants or [])]
        done = subprocess.run(command, cwd=where)
        failed += done.returncode != 0
    summary(groups)
    return 1 if failed else 0


def results(group: str) -> dict[str, str]:
    """Mutant name -> status from the group's last run (mutmut's meta files)."""
    from mutmut.stats import status_by_exit_code

    found: dict[str, str] = {}
    for meta in sorted((BUILD / group / "mutants").rglob("*.meta")):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            found[name] = status_by_exit_code[code]
    return found


def summary(groups: list[str]) -> None:
    """Per group: the mutants by status, the score (timeouts count as killed; mutants not
    checked yet are left out), and the names of those not killed."""
    columns = ["mutants", "not checked", "killed", "timeout", "survived", "no tests", "other"]
    print("| group | " + " | ".join(columns) + " | score |")
    print("|---" * (len(columns) + 2) + "|")
    lists = []
    for group in groups:
        found = results(group)
        if not found:
            print(f"| {group} | not run | | | | | | | |")
            continue
        counts: dict[str, int] = {}
        for status in found.values():
            counts[status] = counts.get(status, 0) + 1
        killed, timeout = counts.get("killed", 0), counts.get("timeout", 0)
        survived, untested = counts.get("survived", 0), counts.get("no tests", 0)
        unchecked = counts.get("not checked", 0) + counts.get("skipped", 0)
        judged = len(found) - unchecked
        other = judged - killed - timeout - survived - untested
        score = f"{100 * (killed + timeout) / judged:.1f}%" if judged else "-"
        print(
            f"| {group} | {len(found)} | {unchecked} | {killed} | {timeout} | {survived} | "
            f"{untested} | {other} | {score} |"
        )
        alive = [n for n, s in found.items() if s in ("survived", "no tests", "suspicious")]
        lists.append((group, alive, found))
    for group, alive, found in lists:
        if alive:
            print(f"\n{group}: not killed")
            for name in alive:
                print(f"  {found[name]:9} {name}")


def show(group: str, mutant: str) -> int:
    return subprocess.run([str(MUTMUT), "show", mutant], cwd=BUILD / group).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "summary", "show"])
    parser.add_argument("names", nargs="*", help="groups (run, summary) or GROUP MUTANT (show)")
    parser.add_argument(
        "--mutants",
        nargs="+",
        metavar="GLOB",
        help="run: only the mutants with these names or globs (one group)",
    )
    args = parser.parse_args(argv)
    if args.command == "show":
        return show(*args.names)
    unknown = [name for name in args.names if name not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; known: {', '.join(GROUPS)}")
    groups = args.names or list(GROUPS)
    if args.mutants and (args.command != "run" or len(args.names) != 1):
        parser.error("--mutants goes with run and one group")
    if args.command == "run":
        return run(groups, args.mutants)
    summary(groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
