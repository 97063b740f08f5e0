//! `idemgate`: a reverse proxy that makes any HTTP API safe to retry.
//!
//! - `idemgate serve --upstream URL` — the proxy (see the README for every setting).
//! - `idemgate keys list|get|delete|resolve` — the admin API from the command line.
//! - `idemgate create-table --store dynamodb://TABLE?region=…` — creates a DynamoDB table on
//!   demand (`serve` never creates one).
//! - `idemgate check --target URL --spec FILE` — checks that any HTTP API behaves idempotently
//!   (see `docs/check.md`); exit 0 pass, 1 violation, 2 usage error or unreachable target.
//! - `idemgate consume --source nats://…|amqp://… --target URL` — queue messages to an HTTP
//!   handler, once per message id and epoch (the `idemgate-consume` crate).

mod admin;
mod check;
mod config;
mod consume;
mod edge;
mod keys;
mod serve;
mod tls;
mod upstream;
mod workers;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "idemgate",
    version,
    about = "Makes any HTTP API safe to retry (Idempotency-Key)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the reverse proxy.
    Serve(Box<config::ServeArgs>),
    /// Inspect and manage records through a running instance's admin API.
    Keys {
        /// Admin API base URL.
        #[arg(
            long,
            env = "IDEMGATE_ADMIN_URL",
            default_value = "http://127.0.0.1:9090"
        )]
        admin: String,
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Create the store's table if it does not exist: DynamoDB, on-demand billing, partition key
    /// `pk` (binary), TTL enabled on `ttl`. `serve` never creates it.
    CreateTable {
        /// Store URL, e.g. dynamodb://idemgate?region=eu-west-1 (credentials from the standard
        /// AWS chain).
        #[arg(long, env = "IDEMGATE_STORE")]
        store: String,
    },
    /// Check that an HTTP API behaves idempotently (for CI): exit 0 when every check passed, 1
    /// on a violation, 2 on a usage error, an invalid spec or an unreachable target.
    Check(Box<check::CheckArgs>),
    /// Consume from NATS JetStream or RabbitMQ and POST each message, once per message id and
    /// epoch, to an HTTP handler (with Idempotency-Key and Idempotency-Epoch); ack only once the
    /// outcome is recorded.
    Consume(Box<consume::ConsumeArgs>),
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IDEMGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}

/// Raises the soft limit of open file descriptors to the hard limit (services often inherit a
/// soft limit of 1024, too few for a proxy: each connection takes one, and its upstream connection
/// another), and logs the result.
fn raise_fd_limit() {
    let before = rlimit::Resource::NOFILE.get();
    match (before, rlimit::increase_nofile_limit(u64::MAX)) {
        (Ok((soft, hard)), Ok(now)) if now > soft => {
            tracing::info!(
                fd_limit = now,
                was = soft,
                hard,
                "raised the file descriptor limit"
            );
        }
        (Ok((soft, hard)), Ok(_)) => {
            tracing::info!(fd_limit = soft, hard, "file descriptor limit");
        }
        (_, Err(e)) | (Err(e), _) => {
            tracing::warn!(error = %e, "could not read or raise the file descriptor limit");
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => {
            let settings = config::resolve(&args)?;
            init_logs(settings.json_logs);
            raise_fd_limit();
            settings.warn_at_start_up();
            runtime.block_on(serve::run(settings))
        }
        Command::Keys { admin, command } => runtime.block_on(keys::run(&admin, command)),
        Command::CreateTable { store } => {
            init_logs(false);
            let done = runtime
                .block_on(idemgate_stores::create_table(&store))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "creating the table of {}: {e}",
                        idemgate_stores::redact(&store)
                    )
                })?;
            println!("{done}");
            Ok(())
        }
        Command::Consume(args) => {
            init_logs(args.json_logs);
            let config = consume::config(*args)?;
            runtime.block_on(consume::run(config))
        }
        Command::Check(args) => {
            // A burst of --concurrency connections needs descriptors like a proxy does.
            raise_fd_limit();
            let code = runtime.block_on(check::run(*args));
            std::process::exit(code)
        }
    }
}
