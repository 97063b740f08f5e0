//! `idemgate`: a reverse proxy that makes any HTTP API safe to retry.
//!
//! - `idemgate serve --upstream URL` — the proxy (see the README for every setting).
//! - `idemgate keys list|get|delete|resolve` — the admin API from the command line.
//! - `idemgate serve --check-config` — validates the configuration and prints it as it takes
//!   effect (exit 0 valid, 1 not).
//! - `idemgate create-table --store dynamodb://TABLE?region=…` — creates a DynamoDB table on
//!   demand (`serve` never creates one).
//! - `idemgate check --target URL --spec FILE` — checks that any HTTP API behaves idempotently
//!   (see `docs/check.md`); exit 0 pass, 1 violation, 2 usage error or unreachable target.
//! - `idemgate consume --source nats://…|amqp://… --target URL` — queue messages to an HTTP
//!   handler, once per message id and epoch (the `idemgate-consume` crate).

mod activity;
mod admin;
mod census;
mod check;
mod config;
mod consume;
mod dash_api;
mod edge;
mod keys;
mod serve;
mod telemetry;
mod tls;
mod traces;
mod upstream;
mod workers;

use anyhow::Result;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Inspect and manage records through a running instance's admin API (a table by default,
    /// --json for scripts; exit 0 done, 1 refused or failed, 2 usage error, 3 not found).
    Keys(Box<keys::KeysArgs>),
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

fn init_logs(json: bool, otel: Option<traces::Layer>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IDEMGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if let Some(otel) = otel {
        return traces::init_logs(filter, ansi, json, otel);
    }
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
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Serve(args) = &mut cli.command {
        // A token given as a flag shows in `ps`: `resolve` warns about it (not about the
        // variable, which clap reads into the same field).
        args.admin_token_on_command_line = matches
            .subcommand_matches("serve")
            .and_then(|m| m.value_source("admin_token"))
            == Some(ValueSource::CommandLine);
    }
    // rustls users that take the process-wide crypto provider (redis-rs for `rediss://`) get
    // ring, the one this build compiles in; the rest of idemgate names it explicitly. An error
    // means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) if args.check_config => {
            // Like `nginx -t`: the verdict on stderr, the configuration on stdout.
            // The TLS files are read too (as `serve` would: the listener's, the upstream's and
            // the store URL's), so that a broken one shows here.
            let checked = config::resolve(&args)
                .and_then(|s| tls::check(&s).map(|()| s))
                .and_then(|s| {
                    idemgate_stores::check(&s.store)
                        .map(|()| s)
                        .map_err(|e| anyhow::Error::new(e).context("the store URL"))
                });
            match checked {
                Ok(settings) => {
                    print!("{}", settings.effective_toml());
                    for warning in settings.warnings() {
                        eprintln!("idemgate: warning: {warning}");
                    }
                    eprintln!("idemgate: the configuration is valid");
                    Ok(())
                }
                Err(e) => {
                    eprintln!("idemgate: the configuration is invalid: {e:#}");
                    std::process::exit(1)
                }
            }
        }
        Command::Serve(args) => {
            let settings = config::resolve(&args)?;
            let (traces, otel) = traces::Traces::start(&args.otel)?;
            init_logs(settings.json_logs, otel);
            raise_fd_limit();
            settings.warn_at_start_up();
            traces.log_start(&args.otel);
            let served = runtime.block_on(serve::run(settings));
            // After the drain: the spans of the last requests are exported before exiting.
            traces.shutdown();
            served
        }
        Command::Keys(args) => std::process::exit(runtime.block_on(keys::run(*args))),
        Command::CreateTable { store } => {
            init_logs(false, None);
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
            init_logs(args.json_logs, None);
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
