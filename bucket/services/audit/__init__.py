"""The tamper-evident audit log (README, "The audit trail").

Seals are Merkle roots over contiguous ranges of stored packets, chained by hash; leaves keep
each sealed packet's content hash. ``sealing`` makes seals in the background, ``proofs``
answers for one packet or the chain, ``verification`` recomputes everything from the rows.
"""
