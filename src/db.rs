//! The sink database: PostgreSQL, or MySQL/MariaDB, chosen by the scheme of `sink.url`.
//! Holds the connection pool, the session settings idemsink relies on, and the migrations
//! of the tables idemsink owns.

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Executor;

use crate::error::MigrationError;

/// Which database a pipeline writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    /// MySQL or MariaDB: the wire protocol and most SQL are shared; where they differ
    /// (see [`crate::writer`]) the server's version decides.
    MySql,
}

impl Backend {
    /// The backend a URL names, by its scheme.
    pub fn of_url(url: &str) -> Option<Backend> {
        let scheme = url.split_once("://")?.0;
        match scheme {
            "postgres" | "postgresql" => Some(Backend::Postgres),
            "mysql" | "mariadb" => Some(Backend::MySql),
            _ => None,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
        })
    }
}

/// MySQL session settings that make the server refuse what does not fit instead of storing
/// something else: strict mode turns truncation, out-of-range values and invalid dates into
/// errors (its default leaves them warnings on some servers), and READ COMMITTED gives the
/// same locking behaviour as PostgreSQL's default (no gap locks between instances).
const MYSQL_SESSION: [&str; 2] = [
    "SET SESSION sql_mode = CONCAT(@@sql_mode, \
     ',STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO')",
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
];

/// The MySQL and MariaDB error numbers idemsink tells apart, by their server names.
mod mysql_error {
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205; // ER_LOCK_WAIT_TIMEOUT
    pub const LOCK_DEADLOCK: u16 = 1213; // ER_LOCK_DEADLOCK
    pub const TOO_MANY_CONNECTIONS: u16 = 1040; // ER_CON_COUNT_ERROR
    pub const SERVER_SHUTDOWN: u16 = 1053; // ER_SERVER_SHUTDOWN
    pub const CONNECTION_KILLED: u16 = 1927; // ER_CONNECTION_KILLED (MariaDB)
    pub const CLIENT_INTERACTION_TIMEOUT: u16 = 4031; // ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8)
    pub const SPECIFIC_ACCESS_DENIED: u16 = 1227; // ER_SPECIFIC_ACCESS_DENIED_ERROR
    pub const DATA_TRUNCATED: u16 = 1265; // WARN_DATA_TRUNCATED
    pub const TRUNCATED_WRONG_VALUE: u16 = 1292; // ER_TRUNCATED_WRONG_VALUE
    pub const INVALID_CHARACTER_STRING: u16 = 1300; // ER_INVALID_CHARACTER_STRING
    pub const TRUNCATED_WRONG_VALUE_FOR_FIELD: u16 = 1366; // ER_TRUNCATED_WRONG_VALUE_FOR_FIELD
    pub const ILLEGAL_VALUE_FOR_TYPE: u16 = 1367; // ER_ILLEGAL_VALUE_FOR_TYPE
    pub const WRONG_VALUE_FOR_TYPE: u16 = 1411; // ER_WRONG_VALUE_FOR_TYPE
    pub const INVALID_JSON_TEXT: u16 = 3140; // ER_INVALID_JSON_TEXT
    pub const CHECK_CONSTRAINT_VIOLATED: u16 = 3819; // ER_CHECK_CONSTRAINT_VIOLATED (MySQL)
    pub const CONSTRAINT_FAILED: u16 = 4025; // ER_CONSTRAINT_FAILED (MariaDB)
}

/// Whether `e` may pass if the same work is tried again: the server is unreachable or
/// restarting, the connection dropped, or the transaction lost a deadlock or a serialization
/// conflict. Anything else (a constraint, a type, a permission) would fail the same way again.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                use mysql_error::*;
                return matches!(
                    my.number(),
                    LOCK_DEADLOCK
                        | LOCK_WAIT_TIMEOUT
                        | TOO_MANY_CONNECTIONS
                        | SERVER_SHUTDOWN
                        | CONNECTION_KILLED
                        | CLIENT_INTERACTION_TIMEOUT
                );
            }
            let code = db.code().unwrap_or_default();
            // connection exception, serialization failure, deadlock, too many connections,
            // a statement or lock timeout (statement_timeout, lock_timeout: a wait that ended,
            // as MySQL's 1205), admin/crash shutdown, cannot connect now, the session ended
            // for idling inside its transaction or idling at all (the transaction rolled back)
            code.starts_with("08")
                || matches!(
                    &*code,
                    "40001"
                        | "40P01"
                        | "53300"
                        | "57014"
                        | "55P03"
                        | "57P01"
                        | "57P02"
                        | "57P03"
                        | "25P03"
                        | "57P05"
                )
        }
        _ => false,
    }
}

/// A lock wait that ended unanswered: PostgreSQL's `lock_timeout`, MySQL's
/// `innodb_lock_wait_timeout`. Another session holds what the statement needs.
pub fn is_lock_timeout(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    match db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        Some(my) => my.number() == mysql_error::LOCK_WAIT_TIMEOUT,
        None => db.code().is_some_and(|c| c == "55P03"),
    }
}

/// The user lacks a privilege (MySQL's 1227, PostgreSQL's insufficient_privilege).
pub fn is_access_denied(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    match db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        Some(my) => my.number() == mysql_error::SPECIFIC_ACCESS_DENIED,
        None => db.code().is_some_and(|c| c == "42501"),
    }
}

/// How long idemsink's sessions wait, and may be left waiting. Without bounds, a frozen
/// instance (a zombie) that wrote rows holds their locks for as long as it is frozen, and
/// the instance that took its partitions over waits on them with no word in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// One lock wait, at most; the batch is then retried.
    pub lock_timeout: Duration,
    /// A session idle inside a transaction this long is ended by the server, which rolls
    /// its transaction back and releases its locks.
    pub idle_in_transaction: Duration,
}

impl Default for SessionLimits {
    fn default() -> SessionLimits {
        SessionLimits {
            lock_timeout: Duration::from_secs(10),
            idle_in_transaction: Duration::from_secs(60),
        }
    }
}

/// Whole seconds, rounded up: MySQL's timeouts count seconds.
fn seconds(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

/// A connection pool to the sink database.
#[derive(Debug, Clone)]
pub enum DbPool {
    Postgres(PgPool),
    MySql(MySqlPool),
}

impl DbPool {
    /// Connects with at most `max_connections` and the default [`SessionLimits`].
    pub async fn connect(url: &str, max_connections: u32) -> Result<DbPool, sqlx::Error> {
        DbPool::connect_with_limits(url, max_connections, SessionLimits::default()).await
    }

    /// Connects with at most `max_connections`, each session within `limits`; `url` must
    /// name a backend (checked by config).
    pub async fn connect_with_limits(
        url: &str,
        max_connections: u32,
        limits: SessionLimits,
    ) -> Result<DbPool, sqlx::Error> {
        // Short: a database that does not answer is waited for by `retry`, which says so in
        // the log and keeps to the pipeline's `errors.retry_for_ms`.
        let acquire_timeout = Duration::from_secs(5);
        match Backend::of_url(url) {
            Some(Backend::Postgres) => {
                let mut options = PgConnectOptions::from_str(url)?.options([
                    ("lock_timeout", limits.lock_timeout.as_millis().to_string()),
                    (
                        "idle_in_transaction_session_timeout",
                        limits.idle_in_transaction.as_millis().to_string(),
                    ),
                ]);
                // Named, so that another instance waiting on this one's locks can tell who
                // holds them (pg_stat_activity); a name in the URL is kept.
                if options.get_application_name().is_none() {
                    options = options.application_name("idemsink");
                }
                Ok(DbPool::Postgres(
                    PgPoolOptions::new()
                        .max_connections(max_connections)
                        .acquire_timeout(acquire_timeout)
                        .connect_with(options)
                        .await?,
                ))
            }
            Some(Backend::MySql) => {
                // sqlx's MySQL URL parser wants `mysql://`; `mariadb://` is the same thing.
                let url = url.replacen("mariadb://", "mysql://", 1);
                let options = MySqlConnectOptions::from_str(&url)?.timezone(Some("+00:00".into()));
                // MySQL has no timeout for a session idle inside a transaction alone (MariaDB
                // has, MySQL not): `wait_timeout` ends any idle session, so the pool closes
                // its idle connections well before the server would.
                let limits_sql = format!(
                    "SET SESSION innodb_lock_wait_timeout = {}, wait_timeout = {}",
                    seconds(limits.lock_timeout),
                    seconds(limits.idle_in_transaction)
                );
                Ok(DbPool::MySql(
                    MySqlPoolOptions::new()
                        .max_connections(max_connections)
                        .acquire_timeout(acquire_timeout)
                        .idle_timeout(limits.idle_in_transaction / 2)
                        .after_connect(move |conn, _| {
                            let limits_sql = limits_sql.clone();
                            Box::pin(async move {
                                for statement in MYSQL_SESSION {
                                    conn.execute(statement).await?;
                                }
                                conn.execute(limits_sql.as_str()).await?;
                                Ok(())
                            })
                        })
                        .connect_with(options)
                        .await?,
                ))
            }
            None => Err(sqlx::Error::Configuration(
                "the URL must start with postgres://, postgresql://, mysql:// or mariadb://".into(),
            )),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            DbPool::Postgres(_) => Backend::Postgres,
            DbPool::MySql(_) => Backend::MySql,
        }
    }

    /// Creates or upgrades the tables idemsink owns. Safe to run from several instances at
    /// once: sqlx serialises migrations with a lock (advisory lock, `GET_LOCK`).
    pub async fn migrate(&self) -> Result<(), MigrationError> {
        match self {
            DbPool::Postgres(pool) => {
                let mut migrator = sqlx::migrate!("migrations/postgres");
                // The database may also hold another application's sqlx migrations.
                migrator.set_ignore_missing(true);
                Ok(migrator.run(pool).await?)
            }
            DbPool::MySql(pool) => {
                // sqlx takes its migration lock with `GET_LOCK(…, -1)`, which MariaDB answers
                // at once with NULL instead of waiting: instances starting together would
                // apply the same migration at once ("partially applied"). So idemsink takes
                // the lock itself, with a real timeout, on the connection that migrates.
                let mut conn = pool.acquire().await?;
                let locked: Option<i64> =
                    sqlx::query_scalar("SELECT GET_LOCK('idemsink_migrations', ?)")
                        .bind(MIGRATION_LOCK_WAIT_SECONDS)
                        .fetch_one(&mut *conn)
                        .await?;
                if locked != Some(1) {
                    return Err(MigrationError::LockBusy {
                        seconds: MIGRATION_LOCK_WAIT_SECONDS,
                    });
                }
                let mut migrator = sqlx::migrate!("migrations/mysql");
                migrator.set_ignore_missing(true);
                migrator.set_locking(false);
                let migrated = migrator.run_direct(&mut *conn).await;
                let released = sqlx::query("SELECT RELEASE_LOCK('idemsink_migrations')")
                    .execute(&mut *conn)
                    .await;
                migrated?;
                released?;
                Ok(())
            }
        }
    }

    pub async fn close(&self) {
        match self {
            DbPool::Postgres(pool) => pool.close().await,
            DbPool::MySql(pool) => pool.close().await,
        }
    }
}

/// Whether the database refused a row for what it holds: a NOT NULL, CHECK, foreign-key or
/// unique constraint, or a value that does not fit its column (too long, out of range,
/// malformed). The same row would fail again; other rows would not.
pub fn is_rejected_row(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    let code = db.code().unwrap_or_default();
    // SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation).
    if code.starts_with("22") || code.starts_with("23") {
        return true;
    }
    // PostgreSQL's "ON CONFLICT DO UPDATE command cannot affect row a second time": two rows
    // of one statement that its unique index finds equal, where the batch's grouping of keys
    // did not (a key the database could not cast to group it, say). Isolating the rows writes
    // them in separate statements, one after the other, as one-by-one application would.
    if code == "21000"
        && db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some()
    {
        return true;
    }
    // MySQL errors about a value that report a general SQLSTATE: data truncated, incorrect
    // value or string, illegal value, invalid JSON, a CHECK constraint (MySQL, MariaDB).
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .is_some_and(|my| {
            use mysql_error::*;
            matches!(
                my.number(),
                DATA_TRUNCATED
                    | TRUNCATED_WRONG_VALUE
                    | INVALID_CHARACTER_STRING
                    | TRUNCATED_WRONG_VALUE_FOR_FIELD
                    | ILLEGAL_VALUE_FOR_TYPE
                    | WRONG_VALUE_FOR_TYPE
                    | INVALID_JSON_TEXT
                    | CHECK_CONSTRAINT_VIOLATED
                    | CONSTRAINT_FAILED
            )
        })
}

/// How long an instance waits for another one's migrations (MySQL).
const MIGRATION_LOCK_WAIT_SECONDS: i64 = 120;

/// A duplicate key: PostgreSQL's unique_violation, MySQL's ER_DUP_ENTRY.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_follows_the_url_scheme() {
        assert_eq!(
            Backend::of_url("postgres://u@h/db"),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::of_url("postgresql://u@h/db"),
            Some(Backend::Postgres)
        );
        assert_eq!(Backend::of_url("mysql://u@h/db"), Some(Backend::MySql));
        assert_eq!(Backend::of_url("mariadb://u@h/db"), Some(Backend::MySql));
        assert_eq!(Backend::of_url("sqlite://x.db"), None);
        assert_eq!(Backend::of_url("orders"), None);
    }
}
