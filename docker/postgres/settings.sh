# PostgreSQL settings shared by scripts/services (PostgreSQL on the host) and
# docker/postgres/start (the image). Sourced, not run.
#
# The cluster: superuser `postgres`, trust authentication (neither set-up asks for a password:
# publish them on loopback only), UTF-8 with the C.UTF-8 locale (byte order, no ICU).
PG_INITDB_ARGS=(-U postgres --auth=trust -E UTF8 --locale=C.UTF-8)
# The server: each db-client writer and each test holds a few connections.
PG_SERVER_ARGS=(-c max_connections=200)
