-- Threshold alerts of `tally api --alert-rules` (docs/operations.md "Threshold alerts").
-- A crossing: a consumer's usage in a rule's window reached its threshold, recorded once per
-- rule, consumer and window (the sending replica inserts with ON CONFLICT DO NOTHING).
CREATE TABLE alert_crossings (
    rule         TEXT        NOT NULL,
    consumer_id  BIGINT      NOT NULL,
    window_start TIMESTAMPTZ NOT NULL,
    -- The usage when the crossing was seen, and the threshold then.
    usage        NUMERIC     NOT NULL,
    threshold    NUMERIC     NOT NULL,
    crossed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The webhook request that carries it (NULL until grouped).
    delivery     BIGINT,
    PRIMARY KEY (rule, consumer_id, window_start)
);
CREATE INDEX alert_crossings_ungrouped ON alert_crossings (rule, window_start)
    WHERE delivery IS NULL;

-- One webhook request: its body and idempotency key are fixed before the first attempt, so
-- every retry sends the same request; delivered_at is set by the 2xx.
CREATE TABLE alert_deliveries (
    id              BIGSERIAL   PRIMARY KEY,
    rule            TEXT        NOT NULL,
    window_start    TIMESTAMPTZ NOT NULL,
    idempotency_key TEXT        NOT NULL UNIQUE,
    body            TEXT        NOT NULL,
    attempts        INT         NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at    TIMESTAMPTZ
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (id) WHERE delivered_at IS NULL;
