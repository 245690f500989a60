//! db-client integration tests against a real PostgreSQL (see tally-testkit).

mod migrations;
