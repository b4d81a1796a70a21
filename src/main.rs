//! The `idemsink` command line: `run`, `validate`, `migrate`, `offsets` and `dead-letters`
//! over pipeline files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::{error, info};

use idemsink::config::{self, ConfigErrors, LoadedPipeline};
use idemsink::dead_letters_command::DeadLettersError;
use idemsink::error::{ErrorKind, PipelineError};
use idemsink::health::Health;
use idemsink::offsets::TopicPartition;
use idemsink::offsets_command::OffsetsError;
use idemsink::offsets_command::{self, ResetTo};
use idemsink::{dead_letters, dead_letters_command};
use idemsink::{http, pipeline, telemetry, validate};

#[derive(Parser)]
#[command(
    version,
    about = "Sinks Kafka topics into PostgreSQL or MySQL/MariaDB exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as human-readable text, or as one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "IDEMSINK_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every pipeline until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Check the pipeline files, the database connection, the tables and the column mappings.
    Validate(ValidateArgs),
    /// Create or upgrade idemsink's own tables (run also does this at start).
    Migrate(ConfigArg),
    /// Show or move the offsets stored in the database.
    #[command(subcommand)]
    Offsets(OffsetsCommand),
    /// List the records a pipeline wrote to its dead-letter table, or send them to Kafka again.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// The dead letters, in record order: id, topic/partition@offset, when, why, and the
    /// record's key and value.
    List {
        #[command(flatten)]
        pipeline: PipelineArg,
        #[command(flatten)]
        filter: DeadLetterFilter,
        /// At most this many per pipeline.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Produce dead letters again (key, value and headers as they came) to their own topic or
    /// to --to-topic, wait until Kafka has them all, then remove them from the table.
    Requeue {
        #[command(flatten)]
        pipeline: PipelineArg,
        #[command(flatten)]
        filter: DeadLetterFilter,
        /// Send them all to this topic instead of the ones they came from.
        #[arg(long)]
        to_topic: Option<String>,
        /// Leave them in the table.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(clap::Args)]
struct DeadLetterFilter {
    /// Only those from this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only those from this partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Only these (repeatable).
    #[arg(long = "id")]
    ids: Vec<i64>,
}

impl DeadLetterFilter {
    fn selection(self, limit: Option<u64>) -> dead_letters::Selection {
        dead_letters::Selection {
            topic: self.topic,
            partition: self.partition,
            ids: self.ids,
            limit,
        }
    }
}

#[derive(Subcommand)]
enum OffsetsCommand {
    /// Per pipeline, topic and partition: the stored offset, Kafka's earliest and end offsets,
    /// and the lag.
    List(PipelineArg),
    /// Store OFFSET as the next offset to read for one partition.
    Set {
        #[command(flatten)]
        pipeline: PipelineArg,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        partition: i32,
        #[arg(long)]
        offset: i64,
        /// Even while an instance is running the pipeline (it is fenced on its next commit).
        #[arg(long)]
        force: bool,
    },
    /// Move every partition's stored offset to earliest, latest, or the first record at or
    /// after a time (RFC 3339, or milliseconds since the epoch).
    Reset {
        #[command(flatten)]
        pipeline: PipelineArg,
        #[arg(long)]
        to: ResetTo,
        /// Only this topic's partitions.
        #[arg(long)]
        topic: Option<String>,
        /// Even while an instance is running the pipeline (it is fenced on its next commit).
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct PipelineArg {
    #[command(flatten)]
    config: ConfigArg,
    /// The pipeline, when the configuration holds several.
    #[arg(long)]
    pipeline: Option<String>,
}

#[derive(clap::Args)]
struct ValidateArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Check the files only, without connecting to the databases (e.g. in CI).
    #[arg(long)]
    offline: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Where to serve /metrics, /healthz and /readyz; "off" serves nothing.
    #[arg(long, env = "IDEMSINK_HTTP_ADDR", default_value = "0.0.0.0:9464")]
    http_addr: String,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// A pipeline YAML file, or a directory whose *.yaml files are each a pipeline.
    #[arg(long, short, env = "IDEMSINK_CONFIG", default_value = "connectors")]
    config: PathBuf,
}

/// Silences sqlx's "ignoring unrecognized connect parameter" line, which prints the value.
const SQLX_URL_PARAMETERS: &str = "sqlx_postgres::options::parse=error";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"))
                // sqlx logs a URL parameter it does not know with its value: a mistyped
                // password parameter would be printed. At any RUST_LOG.
                .add_directive(SQLX_URL_PARAMETERS.parse().expect("a valid directive")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(&CliError::Setup(format!(
                "cannot start the async runtime: {e}"
            )))
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(a) => run(a).await,
            Command::Validate(a) => validate_cmd(a).await,
            Command::Migrate(a) => migrate(a).await,
            Command::Offsets(c) => offsets(c).await,
            Command::DeadLetters(c) => dead_letters_cmd(c).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Why a command failed. Each failure keeps its type up to here, where its kind becomes the
/// exit code (see [`ErrorKind::exit_code`]).
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Pipeline(#[from] PipelineError),
    #[error("{0}")]
    Offsets(#[from] OffsetsError),
    #[error("{0}")]
    DeadLetters(#[from] DeadLettersError),
    /// A command line that names what does not exist or cannot be (a pipeline, an address).
    #[error("{0}")]
    Usage(String),
    /// The process could not set itself up (the runtime, signals, metrics, the listener).
    #[error("{0}")]
    Setup(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CliError {
    fn kind(&self) -> ErrorKind {
        match self {
            CliError::Config(_) | CliError::Usage(_) => ErrorKind::Configuration,
            CliError::Pipeline(e) => e.kind(),
            CliError::Offsets(e) => e.kind(),
            CliError::DeadLetters(e) => e.kind(),
            CliError::Setup(_) => ErrorKind::Permanent,
            CliError::Internal(_) => ErrorKind::Internal,
        }
    }
}

fn fail(e: &CliError) -> ExitCode {
    // Several configuration problems come as several lines: each is a reason on its own.
    for line in e.to_string().lines() {
        eprintln!("idemsink: error: {line}");
    }
    ExitCode::from(e.kind().exit_code())
}

fn load(a: &ConfigArg) -> Result<Vec<LoadedPipeline>, CliError> {
    Ok(config::load_all(&a.config)?)
}

async fn run(a: RunArgs) -> Result<(), CliError> {
    // Listening first: a SIGTERM that comes while starting (a pod deleted at once) is a clean
    // shutdown too, not the default action's kill.
    let signal = shutdown_signal()
        .map_err(|e| CliError::Setup(format!("cannot listen for SIGTERM and SIGINT: {e}")))?;
    let pipelines = load(&a.config)?;
    let (stop, stopped) = watch::channel(false);
    let health = Arc::new(Health::default());
    let server = serve_http(&a.http_addr, health.clone(), stopped.clone()).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for pipeline in pipelines {
        let status = health.register(pipeline.name());
        tasks.spawn(pipeline::run(pipeline, stopped.clone(), status));
    }
    let mut signal = std::pin::pin!(signal);
    let mut first_error = None;
    loop {
        tokio::select! {
            _ = &mut signal, if !*stop.borrow() => {
                info!("shutdown requested: finishing the batch in flight, then leaving the group");
                let _ = stop.send(true);
            }
            joined = tasks.join_next() => {
                let Some(joined) = joined else { break };
                let outcome = joined
                    .map_err(|e| CliError::Internal(format!("a pipeline task failed: {e}")))
                    .and_then(|r| r.map_err(CliError::from));
                if let Err(reason) = outcome {
                    error!(kind = %reason.kind(), "{reason}");
                    // One pipeline failing stops the others cleanly; the exit code tells.
                    first_error.get_or_insert(reason);
                    let _ = stop.send(true);
                }
            }
        }
    }
    // The pipelines have ended; the listener follows them out.
    let _ = stop.send(true);
    if let Some(server) = server {
        match server.await {
            Ok(Err(e)) => error!("the HTTP listener failed: {e}"),
            Err(e) => error!("the HTTP listener task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Starts the metrics and health listener, unless `addr` is "off".
async fn serve_http(
    addr: &str,
    health: Arc<Health>,
    stopped: watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>, CliError> {
    if addr == "off" {
        return Ok(None);
    }
    let socket: SocketAddr = addr.parse().map_err(|e| {
        CliError::Usage(format!(
            "--http-addr {addr:?}: {e} (expected host:port, e.g. 0.0.0.0:9464, or off)"
        ))
    })?;
    let metrics =
        telemetry::install().map_err(|e| CliError::Setup(format!("cannot set up metrics: {e}")))?;
    let (bound, server) = http::serve(socket, metrics, health, stopped)
        .await
        .map_err(|e| CliError::Setup(format!("--http-addr {addr}: cannot listen: {e}")))?;
    info!(address = %bound, "serving /metrics, /healthz and /readyz");
    Ok(Some(server))
}

/// Resolves on the first SIGTERM or SIGINT; the handlers are in place once this returns.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

async fn validate_cmd(a: ValidateArgs) -> Result<(), CliError> {
    let report = validate::validate(&a.config.config, a.offline).await;
    for line in &report.ok {
        println!("ok: {line}");
    }
    for problem in &report.problems {
        println!("error: {problem}");
    }
    match report.problems.len() {
        0 => Ok(()),
        n => Err(CliError::Usage(format!("{n} problem(s) found"))),
    }
}

async fn migrate(a: ConfigArg) -> Result<(), CliError> {
    let pipelines = load(&a)?;
    let mut done = std::collections::BTreeSet::new();
    for pipeline in &pipelines {
        // Several pipelines often share one database: migrate each URL once.
        if !done.insert(pipeline.config.sink.url.clone()) {
            continue;
        }
        let pool = pipeline::connect_migrated(pipeline, std::time::Duration::ZERO).await?;
        pool.close().await;
        println!("migrated {}", config::redact_url(&pipeline.config.sink.url));
    }
    Ok(())
}

async fn offsets(command: OffsetsCommand) -> Result<(), CliError> {
    let changes = match command {
        OffsetsCommand::List(a) => {
            let pipelines = select(&a, false)?;
            println!("{}", offsets_command::table_header());
            for pipeline in &pipelines {
                let listed = offsets_command::list(pipeline).await?;
                for o in &listed {
                    println!("{}", o.table_row(pipeline.name()));
                }
                if let Some(note) = offsets_command::held_note(&listed) {
                    println!("{note}");
                }
            }
            return Ok(());
        }
        OffsetsCommand::Set {
            pipeline,
            topic,
            partition,
            offset,
            force,
        } => {
            let loaded = one(&pipeline)?;
            let tp = TopicPartition { topic, partition };
            offsets_command::set(&loaded, tp, offset, force).await
        }
        OffsetsCommand::Reset {
            pipeline,
            to,
            topic,
            force,
        } => {
            let loaded = one(&pipeline)?;
            offsets_command::reset(&loaded, to, topic, force).await
        }
    };
    for change in changes? {
        println!("{change}");
    }
    Ok(())
}

async fn dead_letters_cmd(command: DeadLettersCommand) -> Result<(), CliError> {
    match command {
        DeadLettersCommand::List {
            pipeline,
            filter,
            limit,
        } => {
            let selection = filter.selection(Some(limit));
            for loaded in select(&pipeline, false)? {
                let listed = dead_letters_command::list(&loaded, &selection).await?;
                println!(
                    "pipeline {}: {} dead letter(s){}",
                    loaded.name(),
                    listed.len(),
                    if listed.len() as u64 == limit {
                        format!(" (the first {limit}; --limit shows more)")
                    } else {
                        String::new()
                    }
                );
                for letter in &listed {
                    println!("{}", dead_letters_command::describe(letter));
                }
            }
        }
        DeadLettersCommand::Requeue {
            pipeline,
            filter,
            to_topic,
            keep,
        } => {
            let loaded = one(&pipeline)?;
            let requeued = dead_letters_command::requeue(
                &loaded,
                &filter.selection(None),
                to_topic.as_deref(),
                keep,
            )
            .await?;
            for r in &requeued {
                let l = &r.letter;
                println!(
                    "dead letter {}: {}/{}@{} -> {}",
                    l.id, l.topic, l.partition, l.offset, r.to_topic
                );
            }
            let fate = if keep { "kept in" } else { "removed from" };
            println!(
                "requeued {} dead letter(s), {fate} the dead-letter table",
                requeued.len()
            );
        }
    }
    Ok(())
}

/// The pipelines `a` names: all of them, or the one given by `--pipeline`.
fn select(a: &PipelineArg, exactly_one: bool) -> Result<Vec<LoadedPipeline>, CliError> {
    let mut pipelines = load(&a.config)?;
    if let Some(name) = &a.pipeline {
        pipelines.retain(|pipeline| pipeline.name() == name);
        if pipelines.is_empty() {
            return Err(CliError::Usage(format!(
                "no pipeline named {name} in {}",
                a.config.config.display()
            )));
        }
    }
    if exactly_one && pipelines.len() > 1 {
        let names: Vec<&str> = pipelines.iter().map(|pipeline| pipeline.name()).collect();
        return Err(CliError::Usage(format!(
            "{} holds several pipelines ({}): choose one with --pipeline",
            a.config.config.display(),
            names.join(", ")
        )));
    }
    Ok(pipelines)
}

fn one(a: &PipelineArg) -> Result<LoadedPipeline, CliError> {
    select(a, true)?
        .pop()
        .ok_or_else(|| CliError::Usage(format!("no pipeline in {}", a.config.config.display())))
}
