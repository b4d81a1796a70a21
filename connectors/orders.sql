-- Target table of connectors/orders.yaml: one row per order, at its newest version. The
-- primary key on order_id is the conflict target of mode upsert; `version` orders the events
-- of one order, so a replayed or late older event never overwrites a newer one.
CREATE TABLE IF NOT EXISTS orders (
    order_id        bigint        PRIMARY KEY,
    version         integer       NOT NULL,
    customer        text          NOT NULL,
    amount          numeric(12,2) NOT NULL,
    status          varchar(16)   NOT NULL,
    created_at      timestamptz,
    payload         jsonb         NOT NULL,
    kafka_partition integer       NOT NULL,
    kafka_offset    bigint        NOT NULL,
    kafka_ts        timestamptz
);
