-- tally's schema. Only files in migrations/ define tables; `tally migrate` and db-client
-- start-up apply them (sqlx migrations, recorded in _sqlx_migrations).

-- The running totals: what users and other tools query.
-- NUMERIC: a total is a sum of unboundedly many 64-bit amounts, so no fixed-width integer is
-- safe; NUMERIC never overflows and never wedges the pipeline.
CREATE TABLE consumer_totals (
    consumer_id BIGINT      PRIMARY KEY,
    total       NUMERIC     NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The db-client's checkpoint: the next Kafka offset to apply per input partition. Written in
-- the same transaction as the totals it covers, so it decides, after any crash, what was added.
CREATE TABLE kafka_offsets (
    topic       TEXT        NOT NULL,
    partition   INTEGER     NOT NULL,
    next_offset BIGINT      NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- What is in the totals: one row per work unit, and per file a roll-up.
-- A unit's sums are spread over every sums partition, each ending with the unit's end marker;
-- the unit is in the totals once the markers of all partitions are applied
-- (partitions_seen = partitions_total). Counting happens under the row's lock, so two
-- db-client instances finishing different partitions of one unit cannot both miss it.
CREATE TABLE ingested_units (
    unit_id          TEXT        PRIMARY KEY,
    file_id          TEXT        NOT NULL,
    partitions_total INTEGER     NOT NULL,
    partitions_seen  INTEGER     NOT NULL,
    lines            BIGINT      NOT NULL,
    bad_lines        BIGINT      NOT NULL,
    bytes            BIGINT      NOT NULL,
    ingested_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ingested_units_file_id ON ingested_units (file_id);

CREATE TABLE ingested_files (
    file_id           TEXT        PRIMARY KEY,
    path              TEXT        NOT NULL,
    units_total       INTEGER     NOT NULL,
    units_ingested    INTEGER     NOT NULL,
    lines             BIGINT      NOT NULL,
    bad_lines         BIGINT      NOT NULL,
    bytes             BIGINT      NOT NULL,
    first_ingested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_ingested_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
