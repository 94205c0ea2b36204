"""The answer fields CONTRACT.md promises, shared by the tests that check them."""

# Each packet of a `pending` answer.
PENDING_FIELDS = frozenset(
    {
        "packet_id",
        "user_id",
        "session_id",
        "lesson_id",
        "system_type",
        "cognitive_state",
        "focus_score",
        "active_seconds",
        "idle_seconds",
        "away_seconds",
        "raw_signals",
        "client_timestamp",
        "received_at",
    }
)
# Each packet of a user listing (its delivery state included).
USER_FIELDS = frozenset(
    {
        "packet_id",
        "user_id",
        "session_id",
        "lesson_id",
        "cognitive_state",
        "focus_score",
        "active_seconds",
        "idle_seconds",
        "away_seconds",
        "received_at",
        "processed_at",
        "processed_by_karma",
        "karma_actions",
        "delivery_state",
    }
)
# The status figures clients read.
STATUS_FIELDS = frozenset(
    {"queue_size", "redis_connected", "total_packets", "processed_packets", "pending_packets"}
)
