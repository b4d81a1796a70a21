-- Records a pipeline with `errors.tolerance: all` could not write: the record as it came from
-- Kafka (key, value, headers) and why. Written in the same transaction as the batch and its
-- offsets, so a dead letter is never lost or doubled; a replay of the same record finds its
-- coordinates already here and adds nothing.
-- headers: a JSON array of {"key": name, "value": text} ({"value_base64": …} when not UTF-8).
-- (`partition` and `offset` are reserved words in MySQL: always quoted.)
CREATE TABLE IF NOT EXISTS idemsink_dead_letters (
    id           BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    pipeline     VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    topic        VARCHAR(249) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    `partition`  INT          NOT NULL,
    `offset`     BIGINT       NOT NULL,
    record_key   LONGBLOB,
    record_value LONGBLOB,
    headers      LONGTEXT     CHARACTER SET utf8mb4,
    error        TEXT         CHARACTER SET utf8mb4 NOT NULL,
    failed_at    TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY idemsink_dead_letters_record (pipeline, topic, `partition`, `offset`)
) ENGINE = InnoDB;
