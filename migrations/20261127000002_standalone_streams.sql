-- `tally standalone` (no Kafka): the done-state of every file (stream) it counted, the same
-- record the parsers keep on the compacted done topic (StreamDone, docs/messages.md), here
-- in PostgreSQL so that it commits in the same transaction as the sums it covers.
CREATE TABLE standalone_streams (
    stream     TEXT        PRIMARY KEY,
    state      JSONB       NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
