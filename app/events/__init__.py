"""Live event delivery: the Postgres LISTEN/NOTIFY bus behind Server-Sent Events."""
