-- Where each pipeline resumes each partition: the next Kafka offset to read.
-- Updated in the same transaction as the rows it covers, as a compare-and-set on next_offset.
CREATE TABLE IF NOT EXISTS idemsink_offsets (
    pipeline    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, topic, partition)
);
