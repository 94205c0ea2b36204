"""What the audit sealer running in the background costs ingest, sealer on against off."""

from __future__ import annotations

import time

from bench.context import Row, Run, Scenario, Section
from bench.harness import Service, bucket_command, median, wrk

SEAL_INTERVAL = 5  # seconds: BUCKET_AUDIT_SEAL_INTERVAL's default


def bench_audit(run: Run) -> None:
    """Single and batch ingest with the audit sealer running (every 5 s, the default) and
    with it off: what sealing in the background costs ingest. Each side runs in a service of
    its own, started afresh and warmed up for each measurement, and the sides take turns going
    first (ABBA), so neither inherits a warmer table or the other's autovacuum. Before a sealed
    measurement, what is stored is sealed first: each side pays only for its own packets."""
    sizes = run.sizes
    connections = sizes.wrk_connections
    batch = {"BATCH": "100"}
    runs: dict[str, list] = {key: [] for key in ("ss", "su", "bs", "bu")}
    for n in range(sizes.audit_rounds):
        order = ("s", "u") if n % 2 == 0 else ("u", "s")
        for side in order:
            interval = str(SEAL_INTERVAL) if side == "s" else "0"
            service = Service(
                {**run.env, "BUCKET_AUDIT_SEAL_INTERVAL": interval}, name=f"bucket-audit-{side}"
            )
            try:
                wrk(service.port, "ingest.lua", 2, connections, {"RUN": f"aw{side}{n}"})
                bucket_command(run.env, "seal")
                for kind, script, clients_, extra in (
                    ("s", "ingest.lua", connections, {}),
                    ("b", "batch.lua", 4, batch),
                ):
                    cpu = service.cpu_seconds() + run.database.cpu_seconds()
                    result = wrk(
                        service.port,
                        script,
                        sizes.seconds,
                        clients_,
                        {"RUN": f"a{kind}{side}{n}", **extra},
                    )
                    # One seal interval more: the sealer's work on the last packets counts too.
                    time.sleep(SEAL_INTERVAL + 1 if sizes.audit_settles else 0)
                    cpu = service.cpu_seconds() + run.database.cpu_seconds() - cpu
                    packets = result["requests"] * (100 if kind == "b" else 1)
                    result["cpu_us_per_packet"] = cpu / max(1, packets) * 1e6
                    runs[f"{kind}{side}"].append(result)
            finally:
                service.stop()
    with run.database.connect() as conn:
        seals = conn.execute(
            "SELECT count(*), coalesce(sum(packet_count), 0) FROM audit_seals"
        ).fetchone()
    rate = {key: median([r["rps"] for r in results]) for key, results in runs.items()}
    run.results["audit"] = {
        "single_rps_with_sealer": rate["ss"],
        "single_rps_without_sealer": rate["su"],
        "single_ratio": rate["ss"] / rate["su"],
        "batch_packets_per_s_with_sealer": rate["bs"] * 100,
        "batch_packets_per_s_without_sealer": rate["bu"] * 100,
        "ratio": rate["bs"] / rate["bu"],
        "seals": int(seals[0]),
        "packets_sealed": int(seals[1]),
        "runs": {key: [round(r["rps"]) for r in results] for key, results in runs.items()},
        # CPU of the service and PostgreSQL per packet: steadier than rates on a shared machine.
        "cpu_us_per_packet": {
            key: median([r["cpu_us_per_packet"] for r in results]) for key, results in runs.items()
        },
        "errors": sum(r["errors"] for results in runs.values() for r in results),
    }


def measure(run: Run) -> None:
    """The sealer's cost, then an empty table for the next scenario."""
    bench_audit(run)
    run.truncate()


def audit_rows(results: dict, row: Row) -> None:
    """Ingest with the sealer against without, and the CPU per packet."""
    if "audit" in results:
        aud = results["audit"]
        row(
            "single ingest with the audit sealer / without",
            f"{aud['single_rps_with_sealer']:,.0f} / {aud['single_rps_without_sealer']:,.0f} "
            f"req/s = {aud['single_ratio']:.2f}",
            ">= 0.95",
        )
        row(
            "batch ingest with the audit sealer / without",
            f"{aud['batch_packets_per_s_with_sealer']:,.0f} / "
            f"{aud['batch_packets_per_s_without_sealer']:,.0f} packets/s = {aud['ratio']:.2f} "
            f"({aud['seals']} seals)",
            ">= 0.95",
        )
        cpu = aud["cpu_us_per_packet"]
        row(
            "service + PostgreSQL CPU per packet, with the sealer / without",
            f"single {cpu['ss']:.0f} / {cpu['su']:.0f} us, "
            f"batch {cpu['bs']:.1f} / {cpu['bu']:.1f} us",
            "(the sealer's cost)",
        )


SCENARIOS = (Scenario("audit", measure, sections=(Section(50, audit_rows),)),)
