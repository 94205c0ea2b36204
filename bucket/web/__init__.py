"""HTTP plumbing below the views: reading bodies, the error shape and its handlers, the consumer
token, ingest rate limits, request metrics and log lines."""
