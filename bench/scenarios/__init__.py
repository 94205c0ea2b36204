"""The scenario families, in the order a full run measures them.

A new family is one module here (its measure functions, its ``SCENARIOS`` with their report
sections) and one entry in ``FAMILIES``.
"""

from __future__ import annotations

from bench.scenarios import audit, delivery, embedded, ingest, table

FAMILIES = (ingest, audit, delivery, table, embedded)
SCENARIOS = tuple(scenario for family in FAMILIES for scenario in family.SCENARIOS)
