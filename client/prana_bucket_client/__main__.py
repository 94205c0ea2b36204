"""``python -m prana_bucket_client``: the consumer command."""

from prana_bucket_client.cli import main

raise SystemExit(main())
