-- The change log behind the API's GET /v1/changes (docs/architecture.md "Change log"):
-- every writer of the totals adds, in the same transaction as its upserts, what it changed:
-- the consumers' new running totals, and the deltas it added to their periods, in events of
-- at most 1,000 consumers each. A transaction that rolls back leaves no event.
--
-- An event's id is (tx, seq): the writing transaction's id and a number rising within it.
-- Transaction ids are taken when a transaction starts writing, not when it commits, so a
-- reader never reads past a transaction that may still commit: it reads only events of
-- transactions older than the oldest one still running (pg_snapshot_xmin), all of which have
-- ended. In (tx, seq) order, no event can then appear behind a reader's position later.
CREATE SEQUENCE tally_changes_seq;

CREATE TABLE tally_changes (
    tx            XID8          NOT NULL DEFAULT pg_current_xact_id(),
    seq           BIGINT        NOT NULL DEFAULT nextval('tally_changes_seq'),
    -- When the writing transaction began (the same for all its events).
    written_at    TIMESTAMPTZ   NOT NULL DEFAULT now(),
    consumer_ids  BIGINT[]      NOT NULL,
    -- A totals event: each consumer's running total after the transaction.
    totals        NUMERIC[],
    -- A periods event: what the transaction added to each (consumer, period).
    period_starts TIMESTAMPTZ[],
    deltas        NUMERIC[],
    PRIMARY KEY (tx, seq),
    CHECK ((totals IS NULL) <> (deltas IS NULL))
);

-- The arrays are compressed with lz4 where the server has it: with pglz, the default, the
-- log took 30% of the db-client's rows/s, with lz4 21% (docs/benchmarks.md).
DO $$
BEGIN
    ALTER TABLE tally_changes
        ALTER COLUMN consumer_ids SET COMPRESSION lz4,
        ALTER COLUMN totals SET COMPRESSION lz4,
        ALTER COLUMN period_starts SET COMPRESSION lz4,
        ALTER COLUMN deltas SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    NULL; -- a server built without lz4 keeps pglz
END $$;

-- Retention: the writers delete whole transactions older than their retention.
CREATE INDEX tally_changes_by_age ON tally_changes (written_at);

-- One row: whether the writers log changes, and the last event id known gone (pruned by
-- retention, or never written while the log was off). A reader whose position lies before it
-- may have missed changes and is told so.
CREATE TABLE tally_change_log (
    only_row  BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    enabled   BOOLEAN NOT NULL DEFAULT true,
    gone_tx   XID8,
    gone_seq  BIGINT
);
INSERT INTO tally_change_log DEFAULT VALUES;
