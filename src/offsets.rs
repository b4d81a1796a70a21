//! The offset store: `idemsink_offsets` holds, per pipeline, topic and partition, the next
//! Kafka offset to read. It is the only source of truth for where a partition resumes, and
//! it moves only inside the transaction that writes the rows it covers, as a compare-and-set
//! on the value the writer last saw — so an instance that lost a partition cannot commit.

use std::collections::{BTreeSet, HashMap};

use sqlx::{PgConnection, PgPool};

/// A partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One partition's move in a batch: from `expected` (None: no row yet) to `next`.
#[derive(Debug, Clone)]
pub struct OffsetMove {
    pub tp: TopicPartition,
    pub expected: Option<i64>,
    pub next: i64,
}

/// Creates or upgrades the tables idemsink owns (safe to run from several instances at once:
/// sqlx serialises migrations with an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut migrator = sqlx::migrate!("migrations/postgres");
    // The database may also hold another application's sqlx migrations.
    migrator.set_ignore_missing(true);
    migrator.run(pool).await
}

/// Reads and moves one pipeline's offsets.
#[derive(Debug, Clone)]
pub struct OffsetStore {
    pipeline: String,
}

impl OffsetStore {
    pub fn new(pipeline: &str) -> OffsetStore {
        OffsetStore {
            pipeline: pipeline.to_string(),
        }
    }

    /// The stored next offsets of `partitions`; partitions with no row are absent.
    pub async fn load(
        &self,
        conn: &mut PgConnection,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
        let topics: Vec<&str> = partitions.iter().map(|tp| tp.topic.as_str()).collect();
        let numbers: Vec<i32> = partitions.iter().map(|tp| tp.partition).collect();
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT o.topic, o.partition, o.next_offset
               FROM idemsink_offsets o
               JOIN UNNEST($2::text[], $3::int4[]) AS want(topic, partition)
                 ON o.topic = want.topic AND o.partition = want.partition
              WHERE o.pipeline = $1",
        )
        .bind(&self.pipeline)
        .bind(&topics)
        .bind(&numbers)
        .fetch_all(conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(topic, partition, next)| (TopicPartition { topic, partition }, next))
            .collect())
    }

    /// Moves every partition in `moves` inside the caller's transaction, each only if its
    /// stored value is still the expected one. Returns the partitions whose value had moved
    /// (another instance owns or owned them): the caller must roll back.
    pub async fn compare_and_set(
        &self,
        tx: &mut PgConnection,
        moves: &[OffsetMove],
    ) -> Result<Vec<TopicPartition>, sqlx::Error> {
        let (updates, inserts): (Vec<&OffsetMove>, Vec<&OffsetMove>) =
            moves.iter().partition(|m| m.expected.is_some());
        let mut done: BTreeSet<(String, i32)> = BTreeSet::new();
        if !updates.is_empty() {
            let rows: Vec<(String, i32)> = sqlx::query_as(
                "UPDATE idemsink_offsets o
                    SET next_offset = m.next, updated_at = now()
                   FROM UNNEST($2::text[], $3::int4[], $4::int8[], $5::int8[]) AS m(topic, partition, expected, next)
                  WHERE o.pipeline = $1 AND o.topic = m.topic AND o.partition = m.partition
                    AND o.next_offset = m.expected
              RETURNING o.topic, o.partition",
            )
            .bind(&self.pipeline)
            .bind(updates.iter().map(|m| m.tp.topic.as_str()).collect::<Vec<_>>())
            .bind(updates.iter().map(|m| m.tp.partition).collect::<Vec<_>>())
            .bind(updates.iter().map(|m| m.expected.unwrap_or(-1)).collect::<Vec<_>>())
            .bind(updates.iter().map(|m| m.next).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            done.extend(rows);
        }
        if !inserts.is_empty() {
            // First commit for these partitions: a row that appeared meanwhile is a conflict too.
            let rows: Vec<(String, i32)> = sqlx::query_as(
                "INSERT INTO idemsink_offsets (pipeline, topic, partition, next_offset)
                 SELECT $1, m.topic, m.partition, m.next
                   FROM UNNEST($2::text[], $3::int4[], $4::int8[]) AS m(topic, partition, next)
                 ON CONFLICT (pipeline, topic, partition) DO NOTHING
              RETURNING topic, partition",
            )
            .bind(&self.pipeline)
            .bind(
                inserts
                    .iter()
                    .map(|m| m.tp.topic.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(inserts.iter().map(|m| m.tp.partition).collect::<Vec<_>>())
            .bind(inserts.iter().map(|m| m.next).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            done.extend(rows);
        }
        Ok(moves
            .iter()
            .filter(|m| !done.contains(&(m.tp.topic.clone(), m.tp.partition)))
            .map(|m| m.tp.clone())
            .collect())
    }
}
