//! Configuration errors: each gives one clear message naming the file and the key, from
//! `validate` and from `run`, without a panic.

mod common;

use std::path::Path;
use std::process::Command;

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
    let out = Command::new(env!("CARGO_BIN_EXE_idemsink"))
        .args([command, "--config"])
        .arg(&file)
        .output()
        .expect("run idemsink");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "idemsink panicked:\n{text}");
    (out.status.success(), text, file)
}

async fn table(pool: &sqlx::PgPool, unique_key: bool) -> String {
    let name = common::unique("cfg_rows");
    let constraint = if unique_key {
        ", UNIQUE (kafka_topic, kafka_partition, kafka_offset)"
    } else {
        ""
    };
    sqlx::query(&format!(
        "CREATE TABLE {name} (id bigint NOT NULL, body text, kafka_topic text, kafka_partition int, kafka_offset bigint{constraint})"
    ))
    .execute(pool)
    .await
    .expect("create table");
    name
}

fn config(table: &str) -> String {
    GOOD.replace("PIPELINE", "cfg_test")
        .replace("BROKERS", &common::brokers())
        .replace("URL", &common::database_url())
        .replace("TABLE", table)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_config_error_names_the_file_and_the_key() {
    let pool = sqlx::PgPool::connect(&common::database_url())
        .await
        .expect("db");
    let dir = tempfile::tempdir().expect("tempdir");
    let good_table = table(&pool, true).await;
    let good = config(&good_table);

    let (ok, text, _) = idemsink("validate", dir.path(), &good);
    assert!(ok, "a good pipeline validates:\n{text}");
    assert!(text.contains(&format!("table {good_table}")), "{text}");

    let no_key_table = table(&pool, false).await;
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
            config(&no_key_table),
            "sink.columns",
            "needs a unique index",
        ),
        (
            "hostile table name",
            good.replace(&good_table, "\"orders; drop table x\""),
            "sink.table",
            "not a plain identifier",
        ),
    ];
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

    // `run` refuses the same way, with a one-line reason and a non-zero exit.
    let (ok, text, file) = idemsink("run", dir.path(), &cases[2].1);
    assert!(!ok, "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("idemsink: error: ")
            && last.contains(&format!("{}: sink.mode:", file.display())),
        "{text}"
    );

    let (ok, text, _) = idemsink("run", dir.path(), "pipeline: [oops\n");
    assert!(!ok && text.contains("not a valid pipeline file"), "{text}");
}
