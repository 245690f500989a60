# PostgreSQL settings shared by scripts/services (PostgreSQL on the host) and
# docker/postgres/start (the image). Sourced, not run.
#
# The cluster: superuser `postgres`, trust authentication (neither set-up asks for a password:
# publish them on loopback only), UTF-8 with the C.UTF-8 locale (byte order, no ICU).
PG_INITDB_ARGS=(-U postgres --auth=trust -E UTF8 --locale=C.UTF-8)
# The server: each db-client writer and each test holds a few connections.
#
# WAL writer and background writer every 10 ms, the latter cleaning up to 1000 buffers a round
# (PostgreSQL's defaults: 200 ms, 200 ms, 100): while a db-client batch dirties the buffer
# pool, a reader (`tally api`) that evicts a dirty buffer must first write it, and flush the
# WAL up to its change; with these it finds clean buffers and a flushed WAL. docs/operations.md
# ("PostgreSQL settings") and docs/benchmarks.md have the figures.
PG_SERVER_ARGS=(
  -c max_connections=200
  -c wal_writer_delay=10ms
  -c bgwriter_delay=10ms
  -c bgwriter_lru_maxpages=1000
  -c bgwriter_lru_multiplier=4
)
