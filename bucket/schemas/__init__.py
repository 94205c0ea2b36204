"""Marshmallow schemas: request validation and response documentation at the HTTP edge,
one module a part of the domain; everything is importable from ``bucket.schemas``."""

from bucket.schemas.audit import (  # noqa: F401
    ArtifactSchema,
    LatestHashSchema,
    SealSchema,
    SealsQuerySchema,
)
from bucket.schemas.base import (  # noqa: F401
    BaseSchema,
    ClientTimestamp,
    StrictNumber,
    Text,
    identifier,
)
from bucket.schemas.delivery import (  # noqa: F401
    MAX_ACK_BATCH,
    AckBatchResultSchema,
    AckBatchSchema,
    AcknowledgementSchema,
    AckResultSchema,
    AckSchema,
    LeaseChangeSchema,
    PacketOutSchema,
    PendingPacketSchema,
    PendingQuerySchema,
    PendingResponseSchema,
    StatusSchema,
    UserPacketSchema,
    UserQuerySchema,
    fast_load_ack,
    fast_load_acks,
)
from bucket.schemas.health import HealthSchema, ReadinessSchema  # noqa: F401
from bucket.schemas.operations import (  # noqa: F401
    DeadQuerySchema,
    MovedSchema,
    ReplaySchema,
    RequeueSchema,
    TimeseriesQuerySchema,
    TimeseriesSchema,
)
from bucket.schemas.packets import (  # noqa: F401
    COGNITIVE_STATES,
    EMS_STATES,
    MAX_IDEMPOTENCY_KEY,
    ROLES,
    SYSTEM_TYPES,
    WINDOW_SECONDS,
    WINDOW_TOLERANCE,
    BatchEnvelopeSchema,
    BatchItemResultSchema,
    BatchResultSchema,
    IngestHeadersSchema,
    IngestResultSchema,
    PacketRules,
    PacketSchema,
    accepted_cognitive_states,
    fast_load_packet,
    packet_rules,
)
from bucket.schemas.quarantine import (  # noqa: F401
    QuarantineEntrySchema,
    QuarantineFiltersSchema,
    QuarantineQuerySchema,
    QuarantineReplayItemSchema,
    QuarantineReplayResultSchema,
    QuarantineReplaySchema,
)
