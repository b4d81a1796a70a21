-- Records a pipeline with `errors.tolerance: all` could not write: the record as it came from
-- Kafka (key, value, headers) and why. Written in the same transaction as the batch and its
-- offsets, so a dead letter is never lost or doubled; a replay of the same record finds its
-- coordinates already here and adds nothing.
-- headers: a JSON array of {"key": name, "value": text} ({"value_base64": …} when not UTF-8).
CREATE TABLE IF NOT EXISTS idemsink_dead_letters (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline     text        NOT NULL,
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    record_key   bytea,
    record_value bytea,
    headers      jsonb,
    error        text        NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pipeline, topic, partition, "offset")
);
