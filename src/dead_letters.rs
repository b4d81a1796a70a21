//! The dead-letter table: records a pipeline with `errors.tolerance: all` could not write,
//! kept as they came from Kafka (key, value, headers) with the reason. Rows go in inside the
//! batch's transaction (see the writer), keyed on the record's coordinates so that a replay
//! adds nothing; the `dead-letters` command lists them and re-queues them to a topic.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sqlx::Executor;

use crate::batch::DeadLetter;
use crate::config::DEFAULT_DEAD_LETTER_TABLE;
use crate::db::{Backend, DbPool};
use crate::schema::TableName;

/// One pipeline's dead letters, in one table.
#[derive(Debug, Clone)]
pub struct DeadLetterTable {
    pipeline: String,
    table: TableName,
    backend: Backend,
    /// The `INSERT` of one dead letter ([`DeadLetterTable::insert_sql`]).
    insert_sql: String,
}

/// A record header as the table keeps it: name and value as text, or in base64 when they are
/// not UTF-8 or hold a NUL (which PostgreSQL's `jsonb` cannot store).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StoredHeader {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

/// Bytes as (text, base64): text when they are UTF-8 without a NUL.
fn text_or_base64(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => (Some(text.to_string()), None),
        _ => (None, Some(BASE64.encode(bytes))),
    }
}

/// The bytes `text_or_base64` described.
fn from_text_or_base64(
    text: Option<String>,
    b64: Option<String>,
) -> Result<Option<Vec<u8>>, String> {
    match (text, b64) {
        (Some(text), _) => Ok(Some(text.into_bytes())),
        (None, Some(b64)) => BASE64
            .decode(b64)
            .map(Some)
            .map_err(|e| format!("bad base64: {e}")),
        (None, None) => Ok(None),
    }
}

/// A Kafka header: its name and value (a header may have no value).
pub type Header = (String, Option<Vec<u8>>);

/// Headers as the table's `headers` column holds them; `None` for a record without any.
pub fn headers_to_json<'a>(
    headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> Option<String> {
    let stored: Vec<StoredHeader> = headers
        .map(|(key, value)| {
            let (key, key_base64) = text_or_base64(key.as_bytes());
            let (value, value_base64) = value.map_or((None, None), text_or_base64);
            StoredHeader {
                key,
                key_base64,
                value,
                value_base64,
            }
        })
        .collect();
    // Serialising plain strings cannot fail.
    (!stored.is_empty()).then(|| serde_json::to_string(&stored).unwrap_or_default())
}

/// The headers the `headers` column describes, as they were.
pub fn headers_from_json(json: &str) -> Result<Vec<Header>, String> {
    let stored: Vec<StoredHeader> = serde_json::from_str(json)
        .map_err(|e| format!("headers are not as idemsink writes them: {e}"))?;
    stored
        .into_iter()
        .map(|h| {
            let key = from_text_or_base64(h.key, h.key_base64)
                .map_err(|e| format!("a header name: {e}"))?
                .ok_or("a header without a name")?;
            let key = String::from_utf8(key).map_err(|e| format!("a header name: {e}"))?;
            let value = from_text_or_base64(h.value, h.value_base64)
                .map_err(|e| format!("header {key}: {e}"))?;
            Ok((key, value))
        })
        .collect()
}

/// An error text the database can store: PostgreSQL's text cannot hold NUL.
fn storable(error: &str) -> std::borrow::Cow<'_, str> {
    if error.contains('\0') {
        error.replace('\0', "\\0").into()
    } else {
        error.into()
    }
}

/// What a statement inserting one dead letter holds besides its key, value, headers and
/// error: the SQL text, the coordinates, the protocol's framing.
const DEAD_LETTER_OVERHEAD: usize = 4096;

/// At most this much of an error text is kept in a dead letter cut to fit.
const ERROR_KEPT: usize = 16 * 1024;

/// The dead letter cut to fit in one statement of at most `limit` bytes (MySQL's
/// `max_allowed_packet`, which a larger one would break, closing the connection), or `None`
/// when it fits whole. The key and value keep their first bytes; headers, JSON that cannot be
/// cut, are kept whole or dropped; the error says what was cut, from what length, with the
/// SHA-256 of what the record held, so the record in Kafka can be told by its coordinates and
/// checked against it.
pub fn fitted(letter: &DeadLetter, limit: usize) -> Option<DeadLetter> {
    let budget = limit.saturating_sub(DEAD_LETTER_OVERHEAD);
    let record = &letter.record;
    let len = |b: &Option<Vec<u8>>| b.as_ref().map_or(0, Vec::len);
    let headers = record.headers.as_ref().map_or(0, String::len);
    if len(&record.key) + len(&record.value) + headers + letter.error.len() <= budget {
        return None;
    }
    let mut error = letter.error.clone();
    truncate_at_char(&mut error, ERROR_KEPT);
    let mut room = budget.saturating_sub(error.len() + 1024);
    let mut cuts = Vec::new();
    let headers = match &record.headers {
        Some(h) if h.len() <= room / 4 => {
            room -= h.len();
            Some(h.clone())
        }
        Some(h) => {
            cuts.push(format!("headers ({} bytes) dropped", h.len()));
            None
        }
        None => None,
    };
    let key_room = if record.value.is_some() {
        room / 2
    } else {
        room
    };
    let key = cut(&record.key, key_room, "key", &mut cuts);
    let value = cut(&record.value, room - len(&key), "value", &mut cuts);
    error.push_str(&format!(
        " [this dead letter was cut to fit the server's max_allowed_packet ({limit} bytes): {}]",
        cuts.join("; ")
    ));
    Some(DeadLetter {
        tp: letter.tp.clone(),
        offset: letter.offset,
        record: crate::batch::RawRecord {
            key,
            value,
            headers,
        },
        error,
    })
}

/// The first `room` bytes of `part`, with a note in `cuts` when that is not all of it.
fn cut(part: &Option<Vec<u8>>, room: usize, what: &str, cuts: &mut Vec<String>) -> Option<Vec<u8>> {
    use sha2::{Digest, Sha256};
    let bytes = part.as_ref()?;
    if bytes.len() <= room {
        return Some(bytes.clone());
    }
    cuts.push(format!(
        "{what} {} bytes, the first {room} kept, SHA-256 of all {:x}",
        bytes.len(),
        Sha256::digest(bytes)
    ));
    Some(bytes[..room].to_vec())
}

/// Shortens `text` to at most `max` bytes, on a character boundary.
fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let at = (0..=max)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(at);
    }
}

/// A dead letter as read back from the table.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub record_key: Option<Vec<u8>>,
    pub record_value: Option<Vec<u8>>,
    pub headers: Option<String>,
    pub error: String,
    /// When it was written, as the database prints it (UTC).
    pub failed_at: String,
}

/// Which dead letters a command concerns.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub ids: Vec<i64>,
    pub limit: Option<u64>,
}

/// Binds a dead letter's values in the order of [`DeadLetterTable::insert_sql`], for either
/// backend's query type.
macro_rules! bind_dead_letter {
    ($query:expr, $pipeline:expr, $letter:expr) => {
        $query
            .bind($pipeline.as_str())
            .bind($letter.tp.topic.as_str())
            .bind($letter.tp.partition)
            .bind($letter.offset)
            .bind($letter.record.key.as_deref())
            .bind($letter.record.value.as_deref())
            .bind($letter.record.headers.as_deref())
            .bind(storable(&$letter.error).as_ref())
    };
}

/// Binds `bound` in order, for either backend's query type.
macro_rules! bind_all {
    ($query:expr, $bound:expr) => {
        $bound.iter().fold($query, |q, b| match b {
            Bound::Text(t) => q.bind(*t),
            Bound::Int(n) => q.bind(*n),
        })
    };
}

/// A value a filter binds.
#[derive(Debug, Clone, Copy)]
enum Bound<'a> {
    Text(&'a str),
    Int(i64),
}

impl DeadLetterTable {
    /// The pipeline's dead-letter table (`errors.dead_letter_table`), created like
    /// `idemsink_dead_letters` if it is another one and missing. Run after the migrations.
    pub async fn open(
        pipeline: &str,
        table: TableName,
        pool: &DbPool,
    ) -> Result<DeadLetterTable, sqlx::Error> {
        let mut opened = DeadLetterTable {
            pipeline: pipeline.to_string(),
            table,
            backend: pool.backend(),
            insert_sql: String::new(),
        };
        opened.insert_sql = opened.insert_sql();
        opened.create_if_missing(pool).await?;
        Ok(opened)
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    pub fn name(&self) -> &TableName {
        &self.table
    }

    /// Creates the table when it is not the one the migrations made, with the same columns
    /// and keys.
    async fn create_if_missing(&self, pool: &DbPool) -> Result<(), sqlx::Error> {
        let default = TableName {
            schema: None,
            name: DEFAULT_DEAD_LETTER_TABLE.to_string(),
        };
        if self.table == default {
            return Ok(());
        }
        let template = default.quoted(self.backend);
        let table = self.table.quoted(self.backend);
        match pool {
            DbPool::Postgres(pool) => {
                let sql =
                    format!("CREATE TABLE IF NOT EXISTS {table} (LIKE {template} INCLUDING ALL)");
                pool.execute(sql.as_str()).await?;
            }
            DbPool::MySql(pool) => {
                let sql = format!("CREATE TABLE IF NOT EXISTS {table} LIKE {template}");
                pool.execute(sql.as_str()).await?;
            }
        }
        Ok(())
    }

    fn quoted(&self, column: &str) -> String {
        crate::schema::quote(self.backend, column)
    }

    /// `pipeline, topic, partition, offset` quoted for the backend.
    fn coordinates(&self) -> String {
        ["pipeline", "topic", "partition", "offset"]
            .map(|c| self.quoted(c))
            .join(", ")
    }

    /// `INSERT` of one dead letter; a record already there (a replay) is left as it is.
    fn insert_sql(&self) -> String {
        let (placeholders, on_conflict) = match self.backend {
            Backend::Postgres => (
                "$1, $2, $3, $4, $5, $6, $7::jsonb, $8",
                format!("ON CONFLICT ({}) DO NOTHING", self.coordinates()),
            ),
            Backend::MySql => (
                "?, ?, ?, ?, ?, ?, ?, ?",
                "ON DUPLICATE KEY UPDATE id = id".to_string(),
            ),
        };
        format!(
            "INSERT INTO {} ({}, record_key, record_value, headers, error) VALUES ({placeholders}) {on_conflict}",
            self.table.quoted(self.backend),
            self.coordinates(),
        )
    }

    /// Adds dead letters inside the batch's transaction, on either database.
    pub async fn insert<DB>(
        &self,
        conn: &mut DB::Connection,
        letters: &[&DeadLetter],
    ) -> Result<(), sqlx::Error>
    where
        DB: sqlx::Database,
        for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> Option<&'q [u8]>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i32: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        for letter in letters {
            bind_dead_letter!(sqlx::query::<DB>(&self.insert_sql), self.pipeline, letter)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// The `WHERE` clause that picks `selection` of this pipeline's dead letters, and the
    /// values it binds, in order.
    fn filter<'s>(&'s self, selection: &'s Selection) -> (String, Vec<Bound<'s>>) {
        let mut bound = vec![Bound::Text(&self.pipeline)];
        let mut conditions = vec!["pipeline".to_string()];
        if let Some(topic) = &selection.topic {
            conditions.push("topic".to_string());
            bound.push(Bound::Text(topic));
        }
        if let Some(partition) = selection.partition {
            conditions.push(self.quoted("partition"));
            bound.push(Bound::Int(i64::from(partition)));
        }
        let mut clause: Vec<String> = conditions
            .iter()
            .enumerate()
            .map(|(i, column)| format!("{column} = {}", self.placeholder(i + 1)))
            .collect();
        if !selection.ids.is_empty() {
            let list: Vec<String> = (0..selection.ids.len())
                .map(|i| self.placeholder(bound.len() + i + 1))
                .collect();
            clause.push(format!("id IN ({})", list.join(", ")));
            bound.extend(selection.ids.iter().map(|id| Bound::Int(*id)));
        }
        (clause.join(" AND "), bound)
    }

    fn placeholder(&self, n: usize) -> String {
        match self.backend {
            Backend::Postgres => format!("${n}"),
            Backend::MySql => "?".to_string(),
        }
    }

    /// The selected dead letters, in the order of their records.
    pub async fn list(
        &self,
        pool: &DbPool,
        selection: &Selection,
    ) -> Result<Vec<StoredDeadLetter>, sqlx::Error> {
        let (clause, bound) = self.filter(selection);
        // MySQL hands ascii_bin columns over as binary: `topic` is cast back to text.
        let (topic, headers, failed_at) = match self.backend {
            Backend::Postgres => (
                "topic",
                "headers::text AS headers",
                "to_char(failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            ),
            Backend::MySql => (
                "CAST(topic AS CHAR) AS topic",
                "headers",
                "DATE_FORMAT(failed_at, '%Y-%m-%dT%H:%i:%s.%fZ')",
            ),
        };
        let limit = selection
            .limit
            .map_or_else(String::new, |n| format!(" LIMIT {n}"));
        let (partition, offset) = (self.quoted("partition"), self.quoted("offset"));
        let sql = format!(
            "SELECT id, {topic}, {partition}, {offset}, record_key, record_value, {headers}, error, \
             {failed_at} AS failed_at FROM {} WHERE {clause} ORDER BY topic, {partition}, {offset}{limit}",
            self.table.quoted(self.backend),
        );
        match pool {
            DbPool::Postgres(pool) => bind_all!(sqlx::query_as(&sql), bound).fetch_all(pool).await,
            DbPool::MySql(pool) => bind_all!(sqlx::query_as(&sql), bound).fetch_all(pool).await,
        }
    }

    /// Removes the dead letters with these ids (after they were re-queued); returns how many.
    pub async fn delete(&self, pool: &DbPool, ids: &[i64]) -> Result<u64, sqlx::Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let selection = Selection {
            ids: ids.to_vec(),
            ..Selection::default()
        };
        let (clause, bound) = self.filter(&selection);
        let sql = format!(
            "DELETE FROM {} WHERE {clause}",
            self.table.quoted(self.backend)
        );
        let done = match pool {
            DbPool::Postgres(pool) => bind_all!(sqlx::query(&sql), bound)
                .execute(pool)
                .await?
                .rows_affected(),
            DbPool::MySql(pool) => bind_all!(sqlx::query(&sql), bound)
                .execute(pool)
                .await?
                .rows_affected(),
        };
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offsets::TopicPartition;

    #[test]
    fn a_dead_letter_too_large_for_a_statement_is_cut_to_fit_and_says_so() {
        let value: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let key = vec![b'k'; 700_000];
        let letter = |key: Option<Vec<u8>>, value: Option<Vec<u8>>, headers: usize| DeadLetter {
            tp: TopicPartition {
                topic: "t".into(),
                partition: 3,
            },
            offset: 9,
            record: crate::batch::RawRecord {
                key,
                value,
                headers: (headers > 0).then(|| format!("[\"{}\"]", "h".repeat(headers))),
            },
            error: "é".repeat(30_000),
        };
        let limit = 1 << 20;
        let small = letter(Some(b"k".to_vec()), Some(b"v".to_vec()), 10);
        assert_eq!(fitted(&small, limit), None, "what fits is kept whole");
        let large = letter(Some(key.clone()), Some(value.clone()), 600_000);
        let cut = fitted(&large, limit).expect("cut");
        let bytes = |b: &Option<Vec<u8>>| b.as_ref().map_or(0, Vec::len);
        let total = bytes(&cut.record.key) + bytes(&cut.record.value) + cut.error.len();
        assert!(total + DEAD_LETTER_OVERHEAD <= limit, "{total}");
        assert_eq!(cut.record.headers, None);
        let kept = cut.record.value.as_deref().expect("value");
        assert!(!kept.is_empty() && value.starts_with(kept));
        assert!(key.starts_with(cut.record.key.as_deref().expect("key")));
        use sha2::{Digest, Sha256};
        for needle in [
            format!("{:x}", Sha256::digest(&value)),
            format!("{:x}", Sha256::digest(&key)),
            "value 2000000 bytes".to_string(),
            "headers (600004 bytes) dropped".to_string(),
            "max_allowed_packet (1048576 bytes)".to_string(),
        ] {
            assert!(
                cut.error.contains(&needle),
                "{needle} in {}",
                &cut.error[30_000..]
            );
        }
        assert!(
            cut.error.starts_with("éé"),
            "the error is cut on a character boundary"
        );
        // Small headers stay; without a value the key may take all the room.
        let key_only = fitted(&letter(Some(vec![b'k'; 2_000_000]), None, 10), limit).expect("cut");
        assert!(key_only.record.headers.is_some());
        assert!(bytes(&key_only.record.key) > 900_000);
    }

    #[test]
    fn headers_survive_the_table_text_and_binary_and_empty() {
        let binary = [0xff_u8, 0x00, 0xfe];
        let headers = [
            ("trace", Some(&b"abc"[..])),
            ("raw", Some(&binary[..])),
            ("flag", None),
            ("trace", Some(&b""[..])),
            ("nul", Some(&b"a\0b"[..])),
            ("name\0with nul", Some(&b"x"[..])),
        ];
        let json = headers_to_json(headers.iter().copied()).expect("some headers");
        assert!(json.contains(r#"{"key":"trace","value":"abc"}"#), "{json}");
        assert!(json.contains(r#""value_base64":"/wD+""#), "{json}");
        assert!(!json.contains("\\u0000"), "no NUL for jsonb: {json}");
        let back = headers_from_json(&json).expect("parses");
        let expected: Vec<Header> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(back, expected);
        assert_eq!(headers_to_json(std::iter::empty()), None);
        assert!(headers_from_json("{").is_err());
        assert!(headers_from_json(r#"[{"value":"x"}]"#).is_err());
    }

    #[test]
    fn error_texts_lose_their_nul_bytes_and_nothing_else() {
        assert_eq!(storable("a\0b"), "a\\0b");
        assert!(matches!(
            storable("plain"),
            std::borrow::Cow::Borrowed("plain")
        ));
    }
}
