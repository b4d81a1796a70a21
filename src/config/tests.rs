//! Loading and checking pipeline files, from YAML text to `LoadedPipeline` or its errors.

use super::load::interpolate_str;
use std::time::Duration;

use super::*;
use crate::batch::BatchLimits;
use crate::db::Backend;

const GOOD: &str = r#"
pipeline: orders_pg
source:
  brokers: 127.0.0.1:9092
  topics: [orders]
  properties:
    session.timeout.ms: 6000
sink:
  url: ${DATABASE_URL}
  table: public.orders
  columns:
    order_id: /order_id
    Customer: /customer/name
    kafka_partition: $partition
    kafka_offset: $offset
"#;

fn load(text: &str, env: &[(&str, &str)]) -> Result<LoadedPipeline, Vec<ConfigError>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, text).expect("write");
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    load_file(&file, &env)
}

fn only_error(text: &str, env: &[(&str, &str)]) -> ConfigError {
    let errors = load(text, env).expect_err("config should be refused");
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.into_iter().next().expect("one error")
}

#[test]
fn loads_a_good_file_with_interpolation_and_defaults() {
    let pipeline = load(GOOD, &[("DATABASE_URL", "postgres://u@h/db")]).expect("valid");
    assert_eq!(pipeline.config.sink.url, "postgres://u@h/db");
    assert_eq!(pipeline.group_id(), "idemsink-orders_pg");
    // What the checks validated comes typed, defaults included.
    assert_eq!(pipeline.backend, Backend::Postgres);
    assert_eq!(
        pipeline.batch,
        BatchLimits {
            max_records: 5000,
            max_bytes: 16 << 20,
            max_wait: Duration::from_millis(100),
        }
    );
    assert_eq!(pipeline.session.lock_timeout, Duration::from_secs(10));
    assert_eq!(
        pipeline.session.idle_in_transaction,
        Duration::from_secs(60)
    );
    assert_eq!(pipeline.retry_for, Duration::from_secs(300));
    assert_eq!(
        pipeline.dead_letter_table.to_string(),
        DEFAULT_DEAD_LETTER_TABLE
    );
    assert_eq!(pipeline.offset_reset, OffsetReset::Stop);
    assert_eq!(
        pipeline
            .properties()
            .get("session.timeout.ms")
            .map(String::as_str),
        Some("6000")
    );
    // Column names keep their case: they are quoted identifiers.
    assert!(pipeline
        .columns
        .iter()
        .any(|(c, s)| c == "Customer" && *s == Source::ValuePointer("/customer/name".into())));
}

#[test]
fn environment_overrides_keys_and_ignores_unrelated_variables() {
    let env = [
        ("DATABASE_URL", "postgres://u@h/db"),
        ("IDEMSINK_SINK__URL", "postgres://other/db"),
        ("IDEMSINK_BATCH__MAX_RECORDS", "42"),
        ("IDEMSINK_TEST_BROKERS", "ignored:1"),
    ];
    let pipeline = load(GOOD, &env).expect("valid");
    assert_eq!(pipeline.config.sink.url, "postgres://other/db");
    assert_eq!(pipeline.config.batch.max_records, 42);
}

#[test]
fn environment_overrides_keep_strings_as_they_are_and_type_what_is_typed() {
    let env = [
        ("DATABASE_URL", "postgres://u@h/db"),
        ("IDEMSINK_SOURCE__GROUP_ID", "007"),
        ("IDEMSINK_PIPELINE", "1e5"),
        ("IDEMSINK_BATCH__MAX_WAIT_MS", "250"),
        ("IDEMSINK_ERRORS__RETRY_FOR_MS", "1000"),
        ("IDEMSINK_SINK__DELETE_ON_NULL", "true"),
    ];
    let pipeline = load(GOOD, &env[..5]).expect("valid");
    assert_eq!(pipeline.group_id(), "007", "not re-typed to 7");
    assert_eq!(pipeline.name(), "1e5", "not re-typed to 100000.0");
    assert_eq!(pipeline.batch.max_wait, Duration::from_millis(250));
    assert_eq!(pipeline.retry_for, Duration::from_secs(1));
    // Parsed as true: tombstones then need a business key, which GOOD does not have.
    let e = only_error(GOOD, &[env[0], env[5]]);
    assert_eq!(e.key, "sink.delete_on_null");
    let e = only_error(GOOD, &[env[0], ("IDEMSINK_BATCH__MAX_RECORDS", "lots")]);
    assert_eq!(e.key, "batch.max_records");
    assert!(e.message.contains("\"lots\""), "{e}");
}

#[test]
fn debezium_format_needs_upsert_and_key_columns_from_the_row() {
    let env = [("DATABASE_URL", "postgres://u@h/db")];
    let file = |sink: &str| {
        GOOD.replace(
            "  table: public.orders\n",
            &format!("  table: public.orders\n  format: debezium\n{sink}"),
        )
    };
    let pipeline = load(&file("  mode: upsert\n  key: [order_id]\n"), &env).expect("valid");
    assert_eq!(pipeline.config.sink.format, RecordFormat::Debezium);
    let refused = [
        ("  key: [order_id]\n", "sink.mode"),
        (
            "  mode: upsert\n  key: [order_id]\n  delete_on_null: true\n",
            "sink.delete_on_null",
        ),
        ("  mode: upsert\n  key: [kafka_offset]\n", "sink.key"),
    ];
    let json = GOOD.replace("Customer: /customer/name", "Customer: $source_position");
    let e = only_error(&json, &env);
    assert!(e.message.contains("only a Debezium change event"), "{e}");
    for (sink, key) in refused {
        let errors = load(&file(sink), &env).expect_err(sink);
        assert!(errors.iter().any(|e| e.key == key), "{sink}: {errors:?}");
    }
    // A truncate is applied by the source's position only.
    let positioned = |sink: &str| {
        file(sink).replace(
            "    kafka_offset: $offset\n",
            "    kafka_offset: $offset\n    src: $source_position\n",
        )
    };
    let applied =
        positioned("  mode: upsert\n  key: [order_id]\n  newer_by: src\n  truncate: apply\n");
    assert_eq!(
        load(&applied, &env).expect("valid").config.sink.truncate,
        OnTruncate::Apply
    );
    let by_offset = positioned(
        "  mode: upsert\n  key: [order_id]\n  newer_by: kafka_offset\n  truncate: apply\n",
    );
    assert_eq!(only_error(&by_offset, &env).key, "sink.truncate");
    // A table that several topics feed: one topic's truncate would delete the others' rows.
    let shared = applied
        .replace("  topics: [orders]", "  topics: [orders, orders_2026]")
        .replace(
            "    kafka_offset: $offset\n",
            "    kafka_offset: $offset\n    kafka_topic: $topic\n",
        );
    let e = only_error(&shared, &env);
    assert_eq!(e.key, "sink.truncate");
    assert!(
        e.message.contains("public.orders") && e.message.contains("orders, orders_2026"),
        "{e}"
    );
    let json = GOOD.replace(
        "  table: public.orders\n",
        "  table: public.orders\n  truncate: ignore\n",
    );
    assert_eq!(only_error(&json, &env).key, "sink.truncate");
    let avro = file("").replace("format: debezium", "format: avro");
    let e = only_error(&avro, &env);
    assert!(
        e.to_string().contains("avro") && e.to_string().contains("debezium"),
        "{e}"
    );
}

#[test]
fn a_pipeline_routes_each_topic_to_its_table_from_the_file() {
    let env = [("DATABASE_URL", "postgres://u@h/db")];
    let cdc = |routing: &str| {
        let topics = "  topics: [Shop.public.orders, Shop.public.order_lines, Shop.inv.items]\n";
        let columns = "    \"*\": auto\n    source_lsn: $source_position\n";
        GOOD.replace("  topics: [orders]\n", topics)
                .replace(
                    "  table: public.orders\n",
                    &format!("  format: debezium\n  mode: upsert\n{routing}"),
                )
                .replace(
                    "    order_id: /order_id\n    Customer: /customer/name\n    kafka_partition: $partition\n    kafka_offset: $offset\n",
                    columns,
                )
    };
    let routing = "  tables:\n    Shop.public.order_lines: replica.lines\n  table_from_topic:\n    pattern: 'Shop\\.(\\w+)\\.(\\w+)'\n    table: 'replica.$2'\n";
    // Debezium's events need no sink.key: each table's primary key is it.
    let pipeline = load(&cdc(routing), &env).expect("valid");
    let table = |topic: &str| {
        pipeline.routes.tables[pipeline.routes.table_of(topic).expect(topic)]
            .table
            .to_string()
    };
    // Topic names keep their case and their dots as map keys.
    assert_eq!(table("Shop.public.orders"), "replica.orders");
    assert_eq!(table("Shop.public.order_lines"), "replica.lines");
    assert_eq!(table("Shop.inv.items"), "replica.items");
    let missing = load(&cdc("  tables:\n    Shop.public.orders: orders\n"), &env);
    let missing = missing.expect_err("two topics without a table");
    let named: Vec<&str> = missing.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(named, ["sink.tables", "sink.tables"]);
    assert!(
        missing[0].message.contains("Shop.public.order_lines"),
        "{missing:?}"
    );
    let both = format!("  table: t\n{routing}");
    assert_eq!(only_error(&cdc(&both), &env).key, "sink.table");
    let dead = GOOD.replace(
        "  table: public.orders\n",
        "  tables:\n    orders: audit.bad\n",
    ) + "errors:\n  dead_letter_table: audit.bad\n";
    assert_eq!(only_error(&dead, &env).key, "errors.dead_letter_table");
}

#[test]
fn columns_auto_maps_the_rest_by_name_and_leaves_key_checks_to_the_table() {
    let env = [("DATABASE_URL", "postgres://u@h/db")];
    let upsert = |columns: &str| {
        GOOD.replace(
                "  columns:\n    order_id: /order_id\n    Customer: /customer/name\n    kafka_partition: $partition\n    kafka_offset: $offset\n",
                &format!("  mode: upsert\n  key: [id]\n  newer_by: version\n  columns:{columns}"),
            )
    };
    let word = load(&upsert(" auto\n"), &env).expect("columns: auto");
    assert!(word.auto_columns && word.columns.is_empty());
    let listed = load(&upsert("\n    \"*\": auto\n    at: $offset\n"), &env).expect("valid");
    assert!(listed.auto_columns);
    assert_eq!(listed.columns, [("at".to_string(), Source::Offset)]);
    let e = only_error(&upsert("\n    \"*\": /everything\n"), &env);
    assert_eq!(e.key, "sink.columns.*");
    // Without auto, the key and version must be listed.
    let errors = load(&upsert("\n    at: $offset\n"), &env).expect_err("unlisted key");
    assert!(errors.iter().any(|e| e.key == "sink.key"), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.key == "sink.newer_by"),
        "{errors:?}"
    );
    let tombstones =
        upsert(" auto\n").replace("  mode: upsert", "  delete_on_null: true\n  mode: upsert");
    assert_eq!(only_error(&tombstones, &env).key, "sink.key");
}

#[test]
fn session_limits_default_and_are_checked() {
    let env = [("DATABASE_URL", "postgres://u@h/db")];
    let pipeline = load(GOOD, &env).expect("valid");
    assert_eq!(pipeline.config.sink.lock_timeout_ms, 10_000);
    assert_eq!(pipeline.config.batch.max_bytes, 16 << 20);
    let e = only_error(GOOD, &[env[0], ("IDEMSINK_BATCH__MAX_BYTES", "100")]);
    assert_eq!(e.key, "batch.max_bytes");
    assert_eq!(pipeline.config.sink.idle_in_transaction_timeout_ms, 60_000);
    for (key, value) in [
        ("IDEMSINK_SINK__LOCK_TIMEOUT_MS", "0"),
        ("IDEMSINK_SINK__IDLE_IN_TRANSACTION_TIMEOUT_MS", "999"),
    ] {
        let e = only_error(GOOD, &[env[0], (key, value)]);
        assert!(
            key.ends_with(&e.key.replace("sink.", "").to_uppercase()),
            "{key}: {e}"
        );
        assert!(e.message.contains("out of range 1000..=86400000"), "{e}");
    }
    assert_eq!(pipeline.config.sink.writers, 2);
    for writers in ["0", "17"] {
        let e = only_error(GOOD, &[env[0], ("IDEMSINK_SINK__WRITERS", writers)]);
        assert_eq!(e.key, "sink.writers");
        assert!(e.message.contains("out of range 1..=16"), "{e}");
    }
    let one = load(GOOD, &[env[0], ("IDEMSINK_SINK__WRITERS", "1")]).expect("valid");
    assert_eq!(one.config.sink.writers, 1);
}

#[test]
fn errors_tolerance_and_dead_letter_table_default_parse_and_are_checked() {
    let env = [("DATABASE_URL", "postgres://u@h/db")];
    let pipeline = load(GOOD, &env).expect("valid");
    assert_eq!(pipeline.config.errors.tolerance, Tolerance::None);
    assert_eq!(
        pipeline.config.errors.dead_letter_table,
        DEFAULT_DEAD_LETTER_TABLE
    );
    let with = |errors: &str| format!("{GOOD}errors:\n{errors}");
    let pipeline = load(
        &with("  tolerance: all\n  dead_letter_table: audit.bad_orders\n"),
        &env,
    )
    .expect("valid");
    assert_eq!(pipeline.config.errors.tolerance, Tolerance::All);
    assert_eq!(pipeline.config.errors.dead_letter_table, "audit.bad_orders");
    let e = only_error(&with("  tolerance: some\n"), &env);
    assert_eq!(e.key, "errors.tolerance");
    assert!(e.message.contains("unknown variant `some`"), "{e}");
    let e = only_error(&with("  dead_letter_table: \"bad; drop table x\"\n"), &env);
    assert_eq!(e.key, "errors.dead_letter_table");
    let e = only_error(&with("  dead_letter_table: public.orders\n"), &env);
    assert_eq!(e.key, "errors.dead_letter_table");
    assert!(e.message.contains("is a sink table"), "{e}");
}

#[test]
fn unknown_key_names_its_section() {
    let text = GOOD.replace(
        "  table: public.orders",
        "  table: public.orders\n  tabel: x",
    );
    let e = only_error(&text, &[("DATABASE_URL", "postgres://h/d")]);
    assert_eq!(e.key, "sink.tabel");
    assert!(e.message.contains("unknown field `tabel`"), "{e}");
    assert!(e
        .to_string()
        .starts_with(&format!("{}: sink.tabel: ", e.file.display())));
}

#[test]
fn bad_mode_is_named() {
    let text = GOOD.replace(
        "  table: public.orders",
        "  table: public.orders\n  mode: merge",
    );
    let e = only_error(&text, &[("DATABASE_URL", "postgres://h/d")]);
    assert_eq!(e.key, "sink.mode");
    assert!(e.message.contains("unknown variant `merge`"), "{e}");
}

#[test]
fn guarantee_properties_are_refused() {
    let text = GOOD.replace(
        "session.timeout.ms: 6000",
        "isolation.level: read_uncommitted",
    );
    let e = only_error(&text, &[("DATABASE_URL", "postgres://h/d")]);
    assert_eq!(e.key, "source.properties.isolation.level");
    assert!(e.message.contains("read_committed"), "{e}");
    let text = GOOD.replace("session.timeout.ms: 6000", "enable.auto.commit: true");
    assert_eq!(
        only_error(&text, &[("DATABASE_URL", "postgres://h/d")]).key,
        "source.properties.enable.auto.commit"
    );
}

#[test]
fn auto_offset_reset_is_applied_by_idemsink_and_checked() {
    let env = [("DATABASE_URL", "postgres://h/d")];
    let with = |line: &str| GOOD.replace("session.timeout.ms: 6000", line);
    let policy = |line: &str| load(&with(line), &env).expect("valid").offset_reset;
    assert_eq!(
        policy("fetch.min.bytes: 1"),
        OffsetReset::Stop,
        "the default"
    );
    assert_eq!(policy("auto.offset.reset: error"), OffsetReset::Stop);
    assert_eq!(policy("auto.offset.reset: smallest"), OffsetReset::Earliest);
    assert_eq!(policy("auto.offset.reset: earliest"), OffsetReset::Earliest);
    assert_eq!(policy("auto.offset.reset: end"), OffsetReset::Latest);
    let e = only_error(&with("auto.offset.reset: newest"), &env);
    assert_eq!(e.key, "source.properties.auto.offset.reset");
    assert!(e.message.contains("earliest or latest"), "{e}");
    let pipeline = load(&with("auto.offset.reset: earliest"), &env).expect("valid");
    assert_eq!(
        crate::consumer::client_config(&pipeline).get("auto.offset.reset"),
        Some("error"),
        "librdkafka never skips on its own"
    );
}

#[test]
fn the_consumer_protocol_refuses_what_the_broker_decides() {
    let env = [("DATABASE_URL", "postgres://h/d")];
    let text = GOOD.replace(
        "session.timeout.ms: 6000",
        "group.protocol: consumer\n    session.timeout.ms: 6000",
    );
    let e = only_error(&text, &env);
    assert_eq!(e.key, "source.properties.session.timeout.ms");
    assert!(e.message.contains("KIP-848"), "{e}");
    let text = GOOD.replace(
        "session.timeout.ms: 6000",
        "group.protocol: consumer\n    group.remote.assignor: uniform",
    );
    load(&text, &env).expect("the consumer protocol on its own is valid");
}

#[test]
fn missing_environment_variable_is_named() {
    let e = only_error(GOOD, &[]);
    assert_eq!(e.key, "sink.url");
    assert!(e.message.contains("DATABASE_URL is not set"), "{e}");
}

#[test]
fn insert_mode_needs_the_kafka_coordinates() {
    let text = GOOD.replace("    kafka_offset: $offset\n", "");
    let e = only_error(&text, &[("DATABASE_URL", "postgres://h/d")]);
    assert_eq!(e.key, "sink.columns");
    assert!(e.message.contains("$offset"), "{e}");
    // Offsets compare within a topic: two topics into one table need $topic too, a
    // table each does not.
    let env = [("DATABASE_URL", "postgres://h/d")];
    let two_topics = GOOD.replace("topics: [orders]", "topics: [orders, refunds]");
    let e = only_error(&two_topics, &env);
    assert!(e.message.contains("$topic"), "{e}");
    let a_table_each = two_topics.replace(
        "  table: public.orders\n",
        "  tables:\n    orders: public.orders\n    refunds: public.refunds\n",
    );
    assert!(load(&a_table_each, &env).is_ok());
}

#[test]
fn business_key_rules_name_their_key() {
    let url = [("DATABASE_URL", "mysql://h/d")];
    let keyed = |sink: &str| GOOD.replace("  columns:", &format!("{sink}  columns:"));
    let upsert_without_key = only_error(&keyed("  mode: upsert\n"), &url);
    assert_eq!(upsert_without_key.key, "sink.key");
    let unmapped = only_error(&keyed("  mode: upsert\n  key: [nope]\n"), &url);
    assert!(
        unmapped.message.contains("`nope` is not mapped"),
        "{unmapped}"
    );
    let deletes = only_error(
        &keyed("  mode: upsert\n  key: [order_id]\n  delete_on_null: true\n"),
        &url,
    );
    assert!(deletes.message.contains("from the record key"), "{deletes}");
    let version = only_error(
        &keyed("  mode: insert\n  key: [order_id]\n  newer_by: Customer\n"),
        &url,
    );
    assert_eq!(version.key, "sink.newer_by");
    let fine = keyed("  mode: upsert\n  key: [order_id]\n  newer_by: kafka_offset\n").replace(
        "    kafka_partition: $partition\n    kafka_offset: $offset\n",
        "    kafka_offset: $offset\n",
    );
    assert!(
        load(&fine, &url).is_ok(),
        "upsert on a key needs no coordinates"
    );
    // The record's time has milliseconds: versions written within one would tie.
    let by_time = only_error(
        &keyed("  mode: upsert\n  key: [order_id]\n  newer_by: Customer\n")
            .replace("Customer: /customer/name", "Customer: $timestamp"),
        &url,
    );
    assert_eq!(by_time.key, "sink.newer_by");
    assert!(by_time.message.contains("millisecond"), "{by_time}");
}

#[test]
fn a_placeholder_setting_is_checked_and_only_for_debezium() {
    let url = [("DATABASE_URL", "postgres://u@h/db")];
    let with = |format: &str, placeholder: &str| {
        GOOD.replace(
            "  table: public.orders\n",
            &format!(
                "  table: public.orders\n  format: {format}\n  mode: upsert\n  \
                 unavailable_value_placeholder: '{placeholder}'\n"
            ),
        )
        .replace(
            "    kafka_partition: $partition\n    kafka_offset: $offset\n",
            "",
        )
    };
    assert!(load(&with("debezium", "hex:00ff"), &url).is_ok());
    for (format, placeholder, reason) in [
        ("debezium", "hex:0", "hexadecimal"),
        ("debezium", "hex:zz", "hexadecimal"),
        ("debezium", "", "empty"),
        ("json", "__x", "only applies to Debezium"),
    ] {
        let errors = load(&with(format, placeholder), &url).expect_err(placeholder);
        assert!(
            errors.iter().any(
                |e| e.key == "sink.unavailable_value_placeholder" && e.message.contains(reason)
            ),
            "{placeholder}: {errors:?}"
        );
    }
}

#[test]
fn hostile_names_are_refused() {
    let text = GOOD.replace("table: public.orders", "table: \"orders; drop table x\"");
    assert_eq!(
        only_error(&text, &[("DATABASE_URL", "postgres://h/d")]).key,
        "sink.table"
    );
    let text = GOOD.replace("order_id: /order_id", "\"a\\\"b\": /order_id");
    assert_eq!(
        only_error(&text, &[("DATABASE_URL", "postgres://h/d")]).key,
        "sink.columns.a\"b"
    );
    let text = GOOD.replace("pipeline: orders_pg", "pipeline: Orders-PG");
    assert_eq!(
        only_error(&text, &[("DATABASE_URL", "postgres://h/d")]).key,
        "pipeline"
    );
}

#[test]
fn malformed_yaml_is_an_error_not_a_panic() {
    let e = only_error("pipeline: [unclosed\n", &[]);
    assert!(e.message.contains("not a valid pipeline file"), "{e}");
}

#[test]
fn urls_are_redacted() {
    assert_eq!(
        redact_url("postgres://app:s3cret@db:5432/x?sslmode=require"),
        "postgres://app:***@db:5432/x?sslmode=require"
    );
    assert_eq!(
        redact_url("postgres://app@db/x?password=s3cret"),
        "postgres://app@db/x?password=***"
    );
    assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
    // Every form a password can take, and none of it survives.
    for (url, shown) in [
        (
            "postgres://127.0.0.1:1/app?user=u&password=TopSecret1",
            "postgres://127.0.0.1:1/app?user=u&password=***",
        ),
        (
            "postgres://u:Top/Secret2@127.0.0.1:1/app",
            "postgres://u:***@127.0.0.1:1/app",
        ),
        (
            "postgres://u:Top?Secret3@db/app?sslmode=require",
            "postgres://u:***@db/app?sslmode=require",
        ),
        (
            "mysql://u:Top@Secret4@db:3306/app",
            "mysql://u:***@db:3306/app",
        ),
        (
            "postgres:///app?host=/var/run/postgresql&password=TopSecret5",
            "postgres:///app?host=/var/run/postgresql&password=***",
        ),
        (
            "postgres://u@db/app?sslpassword=TopSecret6&Password=TopSecret7&passwrd=TopSecret8",
            "postgres://u@db/app?sslpassword=***&Password=***&passwrd=***",
        ),
        (
            "postgres://app:TopSecret9@h1:5432,h2:5432/db?target_session_attrs=read-write",
            "postgres://app:***@h1:5432,h2:5432/db?target_session_attrs=read-write",
        ),
    ] {
        assert_eq!(redact_url(url), shown, "{url}");
    }
}

#[test]
fn several_hosts_in_the_url_are_refused_without_the_password() {
    let url = "postgres://app:TopSecret@h1:5432,h2:5432/db";
    let e = only_error(GOOD, &[("DATABASE_URL", url)]);
    assert_eq!(e.key, "sink.url");
    assert!(e.message.contains("h1:5432,h2:5432"), "{e}");
    assert!(!e.to_string().contains("TopSecret"), "{e}");
}

#[test]
fn interpolation_supports_defaults_and_reports_unterminated() {
    let env = vec![("A".to_string(), "1".to_string())];
    assert_eq!(
        interpolate_str("x${A}y${B:-2}z", &env).as_deref(),
        Ok("x1y2z")
    );
    assert!(interpolate_str("x${A", &env).is_err());
}
