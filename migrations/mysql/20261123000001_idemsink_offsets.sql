-- Where each pipeline resumes each partition: the next Kafka offset to read.
-- Updated in the same transaction as the rows it covers, as a compare-and-set on next_offset.
-- (`partition` is a reserved word in MySQL: always quoted.)
CREATE TABLE IF NOT EXISTS idemsink_offsets (
    pipeline    VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    topic       VARCHAR(249) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    `partition` INT          NOT NULL,
    next_offset BIGINT       NOT NULL CHECK (next_offset >= 0),
    updated_at  TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (pipeline, topic, `partition`)
) ENGINE = InnoDB;
