#!/usr/bin/env python3
"""Check a PRANA Bucket packet against a seal hash you trust, with the standard library alone.

    curl -s -H "Authorization: Bearer $TOKEN" \\
         https://bucket.example/api/v1/audit/artifact/PACKET_ID > artifact.json
    python3 verify_proof.py artifact.json --seal-hash HASH_YOU_KEPT
    # the head you kept is newer than the packet's seal: give the chain between them too
    curl -s -H "Authorization: Bearer $TOKEN" \\
         "https://bucket.example/api/v1/bucket/audit/seals?from=N" > seals.json
    python3 verify_proof.py artifact.json --seal-hash HEAD_HASH_YOU_KEPT --seals seals.json

It checks that the packet's canonical bytes (base64, PostgreSQL's binary record format: a
4-byte field count, then per field its type OID, its length and its big-endian value) hash
to its leaf and say exactly what the answer's ``data`` says, that the inclusion proof leads
from that leaf to its seal's Merkle root (RFC 9162, section 2.1.3.2), that the seal's header
hashes to the seal's hash, and that the chain of seals leads to the hash you trust. Exit 0
when everything holds, 1 otherwise. The server is not trusted for any of it: only the hash you
kept elsewhere is.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import struct
import sys
from datetime import datetime, timedelta, timezone

SEAL_FIELDS = ("seq", "sealed_at", "after_seq", "last_seq", "packet_count", "root", "previous_hash")
# The leaf's fields in order (bucket/services/audit/content.py, LEAF_COLUMNS_V2 and
# LEAF_COLUMNS): formats 1 and 2 state the first list, format 3 adds who sent the packet.
LEAF_FIELDS_V2 = (
    "packet_id", "seq", "dedup_key", "idempotency_key", "user_id", "employee_id", "session_id",
    "lesson_id", "task_id", "system_type", "role", "client_timestamp", "cognitive_state",
    "state", "active_seconds", "idle_seconds", "away_seconds", "focus_score",
    "integrity_score", "raw_signals", "received_at",
)  # fmt: skip
LEAF_FIELDS = (*LEAF_FIELDS_V2, "auth_outcome", "auth_subject", "stale")
FORMAT_FIELDS = {1: LEAF_FIELDS_V2, 2: LEAF_FIELDS_V2, 3: LEAF_FIELDS}
JSON_FIELDS = ("raw_signals",)
TIMESTAMP_FIELDS = ("client_timestamp", "received_at")
# timezone.utc, not datetime.UTC: the verifier runs on Python 3.8 and later.
UTC = timezone.utc  # noqa: UP017
POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def decode_record(content: bytes) -> list:
    """The values of a binary record: text (OID 25), int8 (20), float8 (701), bool (16) and
    timestamp (1114, microseconds since 2000-01-01 UTC); None for NULL."""
    (count,) = struct.unpack_from(">i", content, 0)
    values, position = [], 4
    for _ in range(count):
        oid, length = struct.unpack_from(">Ii", content, position)
        position += 8
        if length < 0:
            values.append(None)
            continue
        data = content[position : position + length]
        position += length
        if oid == 25:
            values.append(data.decode())
        elif oid == 20:
            values.append(struct.unpack(">q", data)[0])
        elif oid == 701:
            values.append(struct.unpack(">d", data)[0])
        elif oid == 16:
            if data not in (b"\x00", b"\x01"):
                raise ValueError("a bool that is neither 0 nor 1")
            values.append(data == b"\x01")
        elif oid == 1114:
            micros = struct.unpack(">q", data)[0]
            values.append(POSTGRES_EPOCH + timedelta(microseconds=micros))
        else:
            raise ValueError(f"field of unknown type {oid}")
    if position != len(content):
        raise ValueError("bytes left over after the last field")
    return values


def fields_of(content: bytes, leaf_format: int = 3) -> dict:
    """The packet as its canonical bytes state it (JSON fields parsed). Leaf format 3 is the
    binary record with the authentication outcome, subject and staleness; 2 the binary record
    without them; 1 (seals made before both) sorted JSON with ISO 8601 times."""
    if leaf_format not in FORMAT_FIELDS:
        raise ValueError(f"unknown leaf format {leaf_format}")
    names = FORMAT_FIELDS[leaf_format]
    if leaf_format == 1:
        stated = json.loads(content)
        if not isinstance(stated, dict) or set(stated) != set(names):
            raise ValueError("not the fields of a packet")
        for name in TIMESTAMP_FIELDS:
            if stated[name] is not None:
                stated[name] = datetime.fromisoformat(stated[name])
        return stated
    values = decode_record(content)
    if len(values) != len(names):
        raise ValueError(f"{len(values)} fields, not {len(names)}")
    stated = dict(zip(names, values))  # noqa: B905 - lengths checked above
    for name in JSON_FIELDS:
        if stated[name] is not None:
            stated[name] = json.loads(stated[name])
    return stated


def as_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def same(name: str, stated, shown) -> bool:
    """Whether the answer shows the field exactly as sealed: JSON by its canonical text (so
    true is not 1 and 1 is not 1.0), numbers of the same kind and bits, times to the
    microsecond."""
    if name in JSON_FIELDS:
        return (
            stated is None
            and shown is None
            or (stated is not None and shown is not None and as_json(stated) == as_json(shown))
        )
    if isinstance(stated, datetime):
        try:
            shown = datetime.fromisoformat(shown)
        except (TypeError, ValueError):
            return False
        if shown.tzinfo is None:
            shown = shown.replace(tzinfo=UTC)
        return stated == shown
    if isinstance(stated, float):
        return type(shown) is float and struct.pack(">d", stated) == struct.pack(">d", shown)
    return type(shown) is type(stated) and stated == shown


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def proof_root(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes | None:
    """The root that ``path`` leads to from ``leaf`` at ``index`` of ``size``; None if the
    path cannot belong to such a tree."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def seal_hash(seal: dict) -> str:
    header = {name: seal[name] for name in SEAL_FIELDS}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check(artifact: dict, trusted: str | None, seals: list[dict]) -> list[str]:
    """Every failed check, in words (none: the packet is proven)."""
    failures = []
    provenance = artifact.get("provenance") or {}
    if not provenance.get("sealed"):
        return ["the packet is not sealed yet: ask again in a few seconds"]
    canonical = base64.b64decode(artifact["canonical"])
    leaf = hashlib.sha256(b"\x00" + canonical).digest()
    if leaf.hex() != provenance["current_hash"]:
        failures.append("the packet's canonical bytes do not hash to its leaf")
    try:
        stated = fields_of(canonical, artifact.get("leaf_format", 2))
    except (ValueError, TypeError, struct.error) as exc:
        failures.append(f"the packet's canonical bytes are not a packet record: {exc}")
    else:
        data = artifact.get("data") or {}
        differ = [name for name in stated if not same(name, stated[name], data.get(name))]
        differ += sorted(name for name in data if name not in stated)
        for name in ("auth_subject", "stale"):
            if name in stated and name in artifact and artifact[name] != stated[name]:
                differ.append(f"{name} (beside data)")
        if "auth_outcome" in stated and "authenticated" in artifact:
            if artifact["authenticated"] != (stated["auth_outcome"] == "verified"):
                differ.append("authenticated (beside data)")
        if differ:
            names = ", ".join(differ)
            failures.append(f"the answer's data differs from its canonical bytes: {names}")
        if artifact.get("artifact_id") != stated["packet_id"]:
            failures.append("the answer's artifact_id is not the sealed packet's id")
    seal = provenance["seal"]
    path = [bytes.fromhex(h) for h in provenance["inclusion_proof"]]
    found = proof_root(leaf, provenance["leaf_index"], provenance["tree_size"], path)
    if found is None or found.hex() != seal["root"]:
        failures.append("the inclusion proof does not lead to the seal's root")
    if provenance["tree_size"] != seal["packet_count"]:
        failures.append("the proof's tree size is not the seal's packet count")
    if seal_hash(seal) != seal["hash"]:
        failures.append("the seal's header does not hash to the seal's hash")
    head = seal
    for later in sorted(seals, key=lambda s: s["seq"]):
        if later["seq"] <= head["seq"]:
            continue
        if later["seq"] != head["seq"] + 1 or later["previous_hash"] != head["hash"]:
            failures.append(f"seal {later['seq']} does not follow seal {head['seq']}")
            break
        if seal_hash(later) != later["hash"]:
            failures.append(f"seal {later['seq']}'s header does not hash to its hash")
            break
        head = later
        if trusted and later["hash"] == trusted:
            break
    if trusted and head["hash"] != trusted:
        failures.append("the chain does not reach the seal hash you trust")
    return failures


def sender(packet: dict) -> str:
    """Who sent the packet, as its leaf states it (formats 1 and 2 do not say)."""
    if "auth_outcome" not in packet:
        return "not sealed (leaf format before 3)"
    outcome = packet["auth_outcome"] or "not checked"
    subject = packet.get("auth_subject")
    return f"{outcome}" + (f" ({subject})" if subject else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="the audit/artifact answer, as JSON ('-': stdin)")
    parser.add_argument("--seal-hash", help="a seal hash you kept elsewhere (recommended)")
    parser.add_argument("--seals", help="the audit/seals answer from the packet's seal on")
    args = parser.parse_args(argv)
    source = sys.stdin if args.artifact == "-" else open(args.artifact, encoding="utf-8")
    with source:
        artifact = json.load(source)
    seals = []
    if args.seals:
        with open(args.seals, encoding="utf-8") as handle:
            seals = json.load(handle)
    failures = check(artifact, args.seal_hash, seals)
    try:
        packet = fields_of(
            base64.b64decode(artifact.get("canonical", "")), artifact.get("leaf_format", 2)
        )
    except (ValueError, TypeError, struct.error):
        packet = {}
    print(
        f"packet {artifact.get('artifact_id')}: user {packet.get('user_id')}, "
        f"received {packet.get('received_at')}, focus {packet.get('focus_score')}, "
        f"state {packet.get('cognitive_state') or packet.get('state')}, "
        f"sender {sender(packet)}"
    )
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures:
        seal = artifact["provenance"]["seal"]
        print(f"proven: included in seal {seal['seq']} (hash {seal['hash']})")
        if not args.seal_hash:
            print("note: compare that seal hash with a copy kept outside the server")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
