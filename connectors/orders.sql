-- Target table of connectors/orders.yaml. The unique constraint on the Kafka coordinates is
-- what makes replays harmless in mode insert.
CREATE TABLE IF NOT EXISTS orders (
    order_id        bigint        NOT NULL,
    customer        text          NOT NULL,
    amount          numeric(12,2) NOT NULL,
    status          varchar(16),
    created_at      timestamptz,
    payload         jsonb         NOT NULL,
    kafka_topic     text          NOT NULL,
    kafka_partition integer       NOT NULL,
    kafka_offset    bigint        NOT NULL,
    kafka_key       text,
    kafka_ts        timestamptz,
    UNIQUE (kafka_topic, kafka_partition, kafka_offset)
);
