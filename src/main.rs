//! The `idemsink` command line: `run`, `validate` and `migrate` over pipeline files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::{error, info};

use idemsink::config::{self, LoadedPipeline};
use idemsink::{pipeline, validate};

#[derive(Parser)]
#[command(version, about = "Sinks Kafka topics into PostgreSQL exactly once")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every pipeline until SIGINT or SIGTERM.
    Run(ConfigArg),
    /// Check the pipeline files, the database connection, the tables and the column mappings.
    Validate(ConfigArg),
    /// Create or upgrade idemsink's own tables (run also does this at start).
    Migrate(ConfigArg),
}

#[derive(clap::Args)]
struct ConfigArg {
    /// A pipeline YAML file, or a directory whose *.yaml files are each a pipeline.
    #[arg(long, short, env = "IDEMSINK_CONFIG", default_value = "connectors")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(a) => run(a).await,
            Command::Validate(a) => validate_cmd(a).await,
            Command::Migrate(a) => migrate(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => fail(&reason),
    }
}

fn fail(reason: &str) -> ExitCode {
    // Several configuration problems come as several lines: each is a reason on its own.
    for line in reason.lines() {
        eprintln!("idemsink: error: {line}");
    }
    ExitCode::FAILURE
}

fn load(a: &ConfigArg) -> Result<Vec<LoadedPipeline>, String> {
    config::load_all(&a.config).map_err(|e| e.to_string())
}

async fn run(a: ConfigArg) -> Result<(), String> {
    let pipelines = load(&a)?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for p in pipelines {
        tasks.spawn(pipeline::run(p, stopped.clone()));
    }
    let mut signal = std::pin::pin!(wait_for_signal());
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
                    .map_err(|e| format!("pipeline task failed: {e}"))
                    .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(reason) = outcome {
                    error!("{reason}");
                    // One pipeline failing stops the others cleanly; the exit code tells.
                    first_error.get_or_insert(reason);
                    let _ = stop.send(true);
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot listen for SIGTERM: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn validate_cmd(a: ConfigArg) -> Result<(), String> {
    let report = validate::validate(&a.config).await;
    for line in &report.ok {
        println!("ok: {line}");
    }
    for problem in &report.problems {
        println!("error: {problem}");
    }
    match report.problems.len() {
        0 => Ok(()),
        n => Err(format!("{n} problem(s) found")),
    }
}

async fn migrate(a: ConfigArg) -> Result<(), String> {
    let pipelines = load(&a)?;
    let mut done = std::collections::BTreeSet::new();
    for p in &pipelines {
        // Several pipelines often share one database: migrate each URL once.
        if !done.insert(p.config.sink.url.clone()) {
            continue;
        }
        let pool = pipeline::connect(p).await.map_err(|e| e.to_string())?;
        pool.migrate()
            .await
            .map_err(|e| format!("{}: migration failed: {e}", p.file.display()))?;
        pool.close().await;
        println!("migrated {}", config::redact_url(&p.config.sink.url));
    }
    Ok(())
}
