//! Configuration errors: each gives one clear message naming the file and the key, from
//! `validate` and from `run`, without a panic.

#[macro_use]
mod common;

use std::path::Path;

use common::Backend;

const GOOD: &str = "pipeline: PIPELINE
source:
  brokers: BROKERS
  topics: [t]
sink:
  url: URL
  table: TABLE
  columns:
    id: /id
    body: /body
    kafka_topic: $topic
    kafka_partition: $partition
    kafka_offset: $offset
";

/// Runs `idemsink <command> --config <file>` on `text`; returns (success, stdout+stderr).
fn idemsink(command: &str, dir: &Path, text: &str) -> (bool, String, std::path::PathBuf) {
    let file = dir.join(format!("{}.yaml", common::unique("cfg")));
    std::fs::write(&file, text).expect("write");
    let (ok, text) = common::idemsink(&[command.as_ref(), "--config".as_ref(), file.as_os_str()]);
    (ok, text, file)
}

/// Creates a table with `columns`; returns its name.
async fn table(pool: &idemsink::db::DbPool, columns: &str) -> String {
    let name = common::unique("cfg_rows");
    let sql = format!("CREATE TABLE {name} ({columns})");
    let created = on_pool!(pool, |p| sqlx::query(&sql).execute(p).await.map(|_| ()));
    created.expect("create table");
    name
}

const COORDINATES: &str =
    "id bigint NOT NULL, body varchar(100), kafka_topic varchar(200), kafka_partition int, kafka_offset bigint";

fn config(backend: Backend, table: &str) -> String {
    GOOD.replace("PIPELINE", "cfg_test")
        .replace("BROKERS", &common::brokers())
        .replace("URL", &common::database_url(backend))
        .replace("TABLE", table)
}

/// The same pipeline on a business key: `sink` holds the lines from `mode:` on.
fn keyed_config(backend: Backend, table: &str, sink: &str) -> String {
    let good = config(backend, table);
    let head = &good[..good.find("  columns:").unwrap_or(good.len())];
    format!("{head}{sink}")
}

on_both_databases!(each_config_error_names_the_file_and_the_key);

async fn each_config_error_names_the_file_and_the_key(backend: Backend) {
    let pool = common::connect(backend).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let good_table = table(
        &pool,
        &format!("{COORDINATES}, UNIQUE (kafka_topic, kafka_partition, kafka_offset)"),
    )
    .await;
    let good = config(backend, &good_table);

    let (ok, text, _) = idemsink("validate", dir.path(), &good);
    assert!(ok, "a good pipeline validates:\n{text}");
    assert!(text.contains(&format!("table {good_table}")), "{text}");

    let no_key_table = table(&pool, COORDINATES).await;
    let keyed_table = table(
        &pool,
        "id bigint NOT NULL PRIMARY KEY, body varchar(100), version bigint, kafka_partition int, kafka_offset bigint",
    )
    .await;
    let keyed = |sink: &str| keyed_config(backend, &keyed_table, sink);
    let columns = "  columns:\n    id: $key\n    body: /body\n    version: /version\n";
    // (what is wrong, the file's text, the key named, what the message says)
    let cases = [
        (
            "unknown key",
            good.replace("  table:", "  tabel: x\n  table:"),
            "sink.tabel",
            "unknown field `tabel`",
        ),
        (
            "missing table",
            good.replace(&good_table, "no_such_table"),
            "sink.table",
            "table no_such_table does not exist",
        ),
        (
            "bad mode",
            good.replace("  columns:", "  mode: merge\n  columns:"),
            "sink.mode",
            "unknown variant `merge`",
        ),
        (
            "isolation.level overridden",
            good.replace(
                "  topics: [t]",
                "  topics: [t]\n  properties:\n    isolation.level: read_uncommitted",
            ),
            "source.properties.isolation.level",
            "may not be set",
        ),
        (
            "unknown column",
            good.replace("    body: /body", "    bodyy: /body"),
            "sink.columns.bodyy",
            "has no column `bodyy`",
        ),
        (
            "no unique key",
            config(backend, &no_key_table),
            "sink.columns",
            "needs a unique index",
        ),
        (
            "business key without a unique key",
            keyed(&format!("  mode: upsert\n  key: [body]\n{columns}")),
            "sink.key",
            "needs a unique index or constraint on exactly (body)",
        ),
        (
            "upsert without a key",
            keyed(&format!("  mode: upsert\n{columns}")),
            "sink.key",
            "mode upsert needs a key",
        ),
        (
            "key column not mapped",
            keyed("  mode: upsert\n  key: [id]\n  columns:\n    body: /body\n"),
            "sink.key",
            "`id` is not mapped",
        ),
        (
            "version column of text",
            keyed(&format!(
                "  mode: upsert\n  key: [id]\n  newer_by: body\n{columns}"
            )),
            "sink.newer_by",
            "a version column must be an integer, timestamp or date",
        ),
        (
            "newer_by in insert mode",
            keyed(&format!(
                "  mode: insert\n  key: [id]\n  newer_by: version\n{columns}"
            )),
            "sink.newer_by",
            "only applies to mode upsert",
        ),
        (
            "delete_on_null with a key read from the value",
            keyed("  mode: upsert\n  key: [id]\n  delete_on_null: true\n  columns:\n    id: /id\n"),
            "sink.key",
            "must come from the record key",
        ),
        (
            "hostile table name",
            good.replace(&good_table, "\"orders; drop table x\""),
            "sink.table",
            "not a plain identifier",
        ),
        (
            "table name with a quote",
            good.replace(&good_table, "'orders\"\"x'"),
            "sink.table",
            "not a plain identifier",
        ),
        (
            "table name with a comment",
            good.replace(&good_table, &format!("{good_table}--")),
            "sink.table",
            "not a plain identifier",
        ),
        (
            "unicode table name",
            good.replace(&good_table, "commandé"),
            "sink.table",
            "not a plain identifier",
        ),
        (
            "hostile column name",
            good.replace(
                "    body: /body",
                "    \"body) VALUES (1); DROP TABLE x; --\": /body",
            ),
            "sink.columns.body) VALUES (1); DROP TABLE x; --",
            "not a plain identifier",
        ),
    ];
    let mut cases = cases.to_vec();
    // Debezium's events without sink.key: each table's primary key is the key.
    cases.push((
        "Debezium's events into a table without a primary key",
        keyed_config(
            backend,
            &no_key_table,
            "  format: debezium\n  mode: upsert\n  columns: auto\n",
        ),
        "sink.key",
        "has no primary key",
    ));
    cases.push((
        "a primary key column of Debezium's events not read from the row",
        keyed("  format: debezium\n  mode: upsert\n  columns:\n    id: $key\n    body: /body\n"),
        "sink.columns.id",
        "is a column of table",
    ));
    // The "not older" guard compares Kafka positions: as numbers, within one topic.
    let (text_type, json_type) = match backend {
        Backend::Postgres => ("text", "jsonb"),
        Backend::MySql => ("varchar(40)", "json"),
    };
    for kind in [text_type, json_type] {
        let texty = table(
            &pool,
            &format!("id bigint NOT NULL PRIMARY KEY, body varchar(100), kafka_partition int, kafka_offset {kind}"),
        )
        .await;
        cases.push((
            "the offset in a non-integer column under the guard",
            keyed_config(
                backend,
                &texty,
                "  mode: upsert\n  key: [id]\n  columns:\n    id: $key\n    body: /body\n    kafka_partition: $partition\n    kafka_offset: $offset\n",
            ),
            "sink.columns.kafka_offset",
            "needs an integer column",
        ));
    }
    cases.push((
        "several topics, positions compared without the topic",
        keyed(
            "  mode: upsert\n  key: [id]\n  columns:\n    id: $key\n    body: /body\n    kafka_partition: $partition\n    kafka_offset: $offset\n",
        )
        .replace("  topics: [t]", "  topics: [t, u]"),
        "sink.columns",
        "map $topic to a column",
    ));
    // The conflict target is the only unique key a written row may collide on, on both
    // databases (MySQL would skip or overwrite; PostgreSQL would refuse every such row), but a
    // generated key the database fills in is fine.
    let generated_id = match backend {
        Backend::Postgres => "id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        Backend::MySql => "id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY",
    };
    {
        // A unique key on a generated column the pipeline writes can collide.
        let generated = table(
            &pool,
            &format!("{generated_id}, order_no varchar(20) NOT NULL UNIQUE, body varchar(100)"),
        )
        .await;
        cases.push((
            "a generated key the pipeline writes",
            keyed_config(
                backend,
                &generated,
                "  mode: upsert\n  key: [order_no]\n  columns:\n    id: /id\n    order_no: $key\n    body: /body\n",
            ),
            "sink.key",
            "has another unique key (id)",
        ));
        let two_keys = table(
            &pool,
            "id bigint NOT NULL PRIMARY KEY, body varchar(100) NOT NULL UNIQUE, version bigint",
        )
        .await;
        cases.push((
            "another unique key beside the conflict key",
            keyed_config(
                backend,
                &two_keys,
                &format!("  mode: upsert\n  key: [id]\n{columns}"),
            ),
            "sink.key",
            "has another unique key (body)",
        ));
    }
    // One table written two ways (`t`, `public.t`): the database's identity, not the spelling,
    // says that two topics share it, and without $topic a newer record would be skipped.
    let shared = table(
        &pool,
        "id bigint NOT NULL PRIMARY KEY, body varchar(100), kafka_partition int, kafka_offset bigint",
    )
    .await;
    let url = common::database_url(backend);
    let schema = match backend {
        Backend::Postgres => "public".to_string(),
        Backend::MySql => {
            let path = url.rsplit_once('/').map_or("", |(_, path)| path);
            path.split('?').next().unwrap_or_default().to_string()
        }
    };
    cases.push((
        "one table spelled two ways",
        keyed_config(
            backend,
            &shared,
            "  mode: upsert\n  key: [id]\n  columns:\n    id: $key\n    body: /body\n    \
             kafka_partition: $partition\n    kafka_offset: $offset\n",
        )
        .replace("  topics: [t]", "  topics: [t, u]")
        .replace(
            &format!("  table: {shared}\n"),
            &format!("  tables:\n    t: {shared}\n    u: {schema}.{shared}\n"),
        ),
        "sink.tables.u",
        "spelled another way",
    ));
    for (what, text, key, message) in &cases {
        let (ok, output, file) = idemsink("validate", dir.path(), text);
        assert!(!ok, "{what}: validate must fail:\n{output}");
        let expected = format!("{}: {key}: ", file.display());
        let line = output
            .lines()
            .find(|l| l.contains(&expected))
            .unwrap_or_else(|| panic!("{what}: no line naming `{expected}`:\n{output}"));
        assert!(
            line.contains(message),
            "{what}: `{line}` should say `{message}`"
        );
    }

    // What stays allowed: one topic; several with $topic mapped; a version column; an
    // AUTO_INCREMENT key the database fills in.
    let positions = table(
        &pool,
        "id bigint NOT NULL PRIMARY KEY, body varchar(100), kafka_topic varchar(200), kafka_partition int, kafka_offset bigint",
    )
    .await;
    let upsert = |columns: &str| {
        keyed_config(
            backend,
            &positions,
            &format!(
                "  mode: upsert\n  key: [id]\n  columns:\n    id: $key\n    body: /body\n{columns}"
            ),
        )
    };
    let allowed = [
        upsert("    kafka_partition: $partition\n    kafka_offset: $offset\n"),
        upsert(
            "    kafka_topic: $topic\n    kafka_partition: $partition\n    kafka_offset: $offset\n",
        )
        .replace("  topics: [t]", "  topics: [t, u]"),
    ];
    for text in allowed {
        let (ok, output, _) = idemsink("validate", dir.path(), &text);
        assert!(ok, "allowed:\n{text}\n{output}");
    }
    for generated_id in [generated_id, "id bigserial PRIMARY KEY"] {
        if backend == Backend::MySql && generated_id.contains("serial") {
            continue;
        }
        let generated = table(
            &pool,
            &format!("{generated_id}, order_no varchar(20) NOT NULL UNIQUE, body varchar(100)"),
        )
        .await;
        let text = keyed_config(
            backend,
            &generated,
            "  mode: upsert\n  key: [order_no]\n  columns:\n    order_no: $key\n    body: /body\n",
        );
        let (ok, output, _) = idemsink("validate", dir.path(), &text);
        assert!(ok, "the database fills id in ({generated_id}):\n{output}");
    }

    // `run` refuses the same way, with a one-line reason and the exit code of a
    // configuration error.
    let file = dir.path().join(format!("{}.yaml", common::unique("cfg")));
    std::fs::write(&file, &cases[2].1).expect("write");
    let (status, text) = common::idemsink_exit(
        &["run".as_ref(), "--config".as_ref(), file.as_os_str()],
        &[],
    );
    common::assert_failed_as(status, common::ErrorKind::Configuration, &text);
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("idemsink: error: ")
            && last.contains(&format!("{}: sink.mode:", file.display())),
        "{text}"
    );

    let (ok, text, _) = idemsink("run", dir.path(), "pipeline: [oops\n");
    assert!(!ok && text.contains("not a valid pipeline file"), "{text}");

    // A login the database refuses: the error names the database, never with the password.
    let url = common::database_url(backend);
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let refused = format!("{scheme}://no_such_user:s3cret-pw@{host}");
    let with_password = good.replace(&url, &refused);
    assert!(with_password.contains("s3cret-pw"));
    for command in ["validate", "run", "migrate"] {
        let (ok, text, _) = idemsink(command, dir.path(), &with_password);
        assert!(!ok, "{command}: {text}");
        assert!(
            text.contains(&format!("no_such_user:***@{host}")),
            "{command} names the database: {text}"
        );
        assert!(
            !text.contains("s3cret-pw"),
            "{command} shows the password: {text}"
        );
    }

    // Every form a password takes in a URL, with every log line a run prints (RUST_LOG=trace):
    // never a password. Port 1 refuses connections; the retry bound keeps `run` short.
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    let mut forms = vec![
        format!("{scheme}://u:Top/Secret2@127.0.0.1:1/idemsink"),
        format!("{scheme}://u:Top?Secret3@127.0.0.1:1/idemsink"),
        format!("{scheme}://u:Top@Secret4@127.0.0.1:1/idemsink"),
        // libpq's form for failover: refused, and the refusal hides the password.
        format!("{scheme}://u:TopSecret7@127.0.0.1:1,127.0.0.1:2/idemsink"),
    ];
    if backend == Backend::Postgres {
        forms.extend([
            "postgres://127.0.0.1:1/idemsink?user=u&password=TopSecret1".to_string(),
            "postgres://u@127.0.0.1:1/idemsink?passwrd=TopSecret5".to_string(),
            "postgres:///idemsink?host=/nonexistent&password=TopSecret6".to_string(),
        ]);
    }
    for form in forms {
        let text = format!(
            "{}errors:\n  retry_for_ms: 300\n",
            good.replace(&url, &form)
        );
        let file = dir
            .path()
            .join(format!("{}.yaml", common::unique("secret")));
        std::fs::write(&file, &text).expect("write");
        for command in ["validate", "run", "migrate"] {
            let args = [command.as_ref(), "--config".as_ref(), file.as_os_str()];
            let (ok, printed) = common::idemsink_with_env(&args, &[("RUST_LOG", "trace")]);
            assert!(!ok, "{command} {form}: {printed}");
            let leaked: Vec<&str> = printed.lines().filter(|l| l.contains("Secret")).collect();
            assert!(
                leaked.is_empty(),
                "{command} {form} printed the password: {leaked:#?}"
            );
        }
    }
}

/// Broken YAML, wrong shapes and binary garbage are errors naming the file, from `validate`
/// and `run`, never a panic (exit code 101) or a hang.
#[test]
fn malformed_files_are_refused_with_the_file_named_and_no_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let texts: [&[u8]; 6] = [
        b"pipeline: [unclosed\n",
        b"pipeline: p\nsource: {brokers: b, topics: t\n",
        b"- just\n- a list\n",
        b"pipeline: p\n\tsource: tabs\n",
        b"\xff\xfe\x00garbage\x00",
        b"",
    ];
    for text in texts {
        let file = dir
            .path()
            .join(format!("{}.yaml", common::unique("broken")));
        std::fs::write(&file, text).expect("write");
        for args in [&["validate"][..], &["run", "--http-addr", "off"][..]] {
            let command = args[0];
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_idemsink"))
                .args(args)
                .arg("--config")
                .arg(&file)
                .output()
                .expect("run idemsink");
            let said = String::from_utf8_lossy(&output.stderr).to_string()
                + &String::from_utf8_lossy(&output.stdout);
            let shown = String::from_utf8_lossy(text);
            assert_ne!(output.status.code(), Some(0), "{command} {shown:?}: {said}");
            assert_ne!(
                output.status.code(),
                Some(101),
                "{command} {shown:?} panicked: {said}"
            );
            assert!(!said.contains("panicked"), "{command} {shown:?}: {said}");
            assert!(
                said.contains(&file.display().to_string()),
                "{command} {shown:?}: the file is named: {said}"
            );
        }
    }
}
