//! The offset store: `idemsink_offsets` holds, per pipeline, topic and partition, the next
//! Kafka offset to read. It is the only source of truth for where a partition resumes, and
//! it moves only inside the transaction that writes the rows it covers, as a compare-and-set
//! on the value the writer last saw — so an instance that lost a partition cannot commit.

use std::collections::{BTreeSet, HashMap};

use sqlx::{MySqlConnection, PgConnection};

use crate::db::DbPool;

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

/// Reads and moves one pipeline's offsets.
#[derive(Debug, Clone)]
pub struct OffsetStore {
    pipeline: String,
    pool: DbPool,
}

impl OffsetStore {
    pub fn new(pipeline: &str, pool: DbPool) -> OffsetStore {
        OffsetStore {
            pipeline: pipeline.to_string(),
            pool,
        }
    }

    /// The stored next offsets of `partitions`; partitions with no row are absent.
    pub async fn load(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
        match &self.pool {
            DbPool::Postgres(pool) => {
                self.load_postgres(&mut *pool.acquire().await?, partitions)
                    .await
            }
            DbPool::MySql(_) => {
                let mut wanted = self.list().await?;
                wanted.retain(|tp, _| partitions.contains(tp));
                Ok(wanted)
            }
        }
    }

    /// Every stored next offset of this pipeline.
    pub async fn list(&self) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
        let rows: Vec<(String, i32, i64)> = match &self.pool {
            DbPool::Postgres(pool) => sqlx::query_as(
                "SELECT topic, partition, next_offset FROM idemsink_offsets WHERE pipeline = $1",
            )
            .bind(&self.pipeline)
            .fetch_all(pool)
            .await?,
            DbPool::MySql(pool) => {
                sqlx::query_as(
                    // ascii_bin text arrives flagged binary; the driver wants it as text.
                    "SELECT CAST(topic AS CHAR), `partition`, next_offset FROM idemsink_offsets WHERE pipeline = ?",
                )
                .bind(&self.pipeline)
                .fetch_all(pool)
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(topic, partition, next)| (TopicPartition { topic, partition }, next))
            .collect())
    }

    /// Sets stored offsets unconditionally, all in one transaction: the `offsets set|reset`
    /// commands. A running instance that owns one of these partitions is fenced by the
    /// compare-and-set on its next commit and rereads from here.
    pub async fn overwrite(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), sqlx::Error> {
        match &self.pool {
            DbPool::Postgres(pool) => {
                let topics: Vec<&str> = offsets.iter().map(|(tp, _)| tp.topic.as_str()).collect();
                let numbers: Vec<i32> = offsets.iter().map(|(tp, _)| tp.partition).collect();
                let next: Vec<i64> = offsets.iter().map(|(_, n)| *n).collect();
                sqlx::query(
                    "INSERT INTO idemsink_offsets (pipeline, topic, partition, next_offset)
                     SELECT $1, m.topic, m.partition, m.next
                       FROM UNNEST($2::text[], $3::int4[], $4::int8[]) AS m(topic, partition, next)
                     ON CONFLICT (pipeline, topic, partition)
                     DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
                )
                .bind(&self.pipeline)
                .bind(&topics)
                .bind(&numbers)
                .bind(&next)
                .execute(pool)
                .await?;
            }
            DbPool::MySql(pool) => {
                let mut tx = pool.begin().await?;
                for (tp, next) in offsets {
                    sqlx::query(
                        "INSERT INTO idemsink_offsets (pipeline, topic, `partition`, next_offset) VALUES (?, ?, ?, ?)
                         ON DUPLICATE KEY UPDATE next_offset = VALUES(next_offset), updated_at = CURRENT_TIMESTAMP(6)",
                    )
                    .bind(&self.pipeline)
                    .bind(&tp.topic)
                    .bind(tp.partition)
                    .bind(next)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    async fn load_postgres(
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

    /// Moves every partition in `moves` inside the caller's PostgreSQL transaction, each only
    /// if its stored value is still the expected one. Returns the partitions whose value had
    /// moved (another instance owns or owned them): the caller must roll back.
    pub async fn compare_and_set_postgres(
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

    /// The same compare-and-set in a MySQL/MariaDB transaction, one statement per partition
    /// (a batch touches a handful). The UPDATE reads the latest committed row under a lock,
    /// so a value moved by another instance's committed transaction never matches.
    pub async fn compare_and_set_mysql(
        &self,
        tx: &mut MySqlConnection,
        moves: &[OffsetMove],
    ) -> Result<Vec<TopicPartition>, sqlx::Error> {
        let mut conflicts = Vec::new();
        for m in moves {
            let moved = match m.expected {
                Some(expected) => {
                    sqlx::query(
                        "UPDATE idemsink_offsets SET next_offset = ?, updated_at = CURRENT_TIMESTAMP(6)
                          WHERE pipeline = ? AND topic = ? AND `partition` = ? AND next_offset = ?",
                    )
                    .bind(m.next)
                    .bind(&self.pipeline)
                    .bind(&m.tp.topic)
                    .bind(m.tp.partition)
                    .bind(expected)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                        == 1
                }
                // First commit for this partition: a row that appeared meanwhile is a conflict
                // too. A failed statement does not end a MySQL transaction; the caller rolls back.
                None => match sqlx::query(
                    "INSERT INTO idemsink_offsets (pipeline, topic, `partition`, next_offset) VALUES (?, ?, ?, ?)",
                )
                .bind(&self.pipeline)
                .bind(&m.tp.topic)
                .bind(m.tp.partition)
                .bind(m.next)
                .execute(&mut *tx)
                .await
                {
                    Ok(_) => true,
                    Err(e) if crate::db::is_unique_violation(&e) => false,
                    Err(e) => return Err(e),
                },
            };
            if !moved {
                conflicts.push(m.tp.clone());
            }
        }
        Ok(conflicts)
    }
}
