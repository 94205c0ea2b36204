"""The scenario families, in the order a full run measures them.

A new family is one module here (its measure functions, its ``SCENARIOS`` with their report
sections) and one entry in ``FAMILIES``. A section's position places its rows in the table:
10 to 90 are taken, and the capacity figures close it at 100.
"""

from __future__ import annotations

from bench.scenarios import (
    audit,
    auth,
    burst,
    consumer,
    delivery,
    embedded,
    ingest,
    storage,
    table,
)

FAMILIES = (ingest, audit, delivery, table, burst, embedded, consumer, auth, storage)
SCENARIOS = tuple(scenario for family in FAMILIES for scenario in family.SCENARIOS)
