//! Traces over OpenTelemetry: `idemgate serve --otel` (or `IDEMGATE_OTEL=1`) exports a span per
//! request over OTLP/HTTP (protobuf), configured by the standard `OTEL_*` variables; off by
//! default, and then nothing of it runs per request (README "Traces").
//!
//! - The spans are `tracing` spans bridged by `tracing-opentelemetry`: `idempotent_request` (the
//!   tower layer's, one per request), `store` (one per store round trip, from
//!   `idemgate_stores::instrumented`) and `upstream` (one per upstream call, here). They are at
//!   `debug` level, so with OTel off they are disabled at their call sites.
//! - [`AdoptTraceparentLayer`] makes a client's W3C `traceparent` the parent of the request's
//!   span; [`PropagateLayer`] opens the `upstream` span and sends its `traceparent` upstream.
//! - Export is batched on the SDK's own thread (queue `OTEL_BSP_MAX_QUEUE_SIZE`, 2048 spans by
//!   default: a span ended while it is full is dropped, and the drops are counted and logged);
//!   [`Traces::shutdown`] flushes what is queued at the end of a graceful shutdown.

#[cfg(feature = "otel")]
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this process exports traces (set once by [`Traces::start`]).
#[cfg(feature = "otel")]
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces: the service stack adds its propagation layers only then.
#[cfg(feature = "otel")]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The switch of `idemgate serve` (flag and environment only, not the config file).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct OtelArgs {
    /// Export a span per request to an OpenTelemetry collector over OTLP/HTTP (protobuf),
    /// configured by the standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT,
    /// OTEL_SERVICE_NAME, ...; README "Traces"). The variable takes 1, true, yes or on
    /// [default: off].
    #[arg(
        long = "otel",
        env = "IDEMGATE_OTEL",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub enabled: bool,
}

/// The subscriber layer that turns `tracing` spans into OpenTelemetry spans.
#[cfg(feature = "otel")]
pub type Layer =
    Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static>;

/// The subscriber layer that turns `tracing` spans into OpenTelemetry spans (none can exist in a
/// build without the `otel` feature).
#[cfg(not(feature = "otel"))]
pub enum Layer {}

/// The running exporter (or nothing, when traces are off); [`Traces::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Traces {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    /// Where spans go, for the start-up log line.
    endpoint: Option<String>,
    /// Settings read but not honoured, warned about once the logs are up.
    ignored: Vec<String>,
}

impl Traces {
    /// Starts the exporter when `args` ask for it (and `OTEL_SDK_DISABLED` is not `true`), and
    /// hands back the subscriber layer to install with the logs. Fails on settings this build
    /// cannot honour (another protocol than http/protobuf, another exporter than otlp).
    pub fn start(args: &OtelArgs) -> anyhow::Result<(Self, Option<Layer>)> {
        if !args.enabled {
            return Ok((Self::default(), None));
        }
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok((Self::default(), None));
        }
        #[cfg(feature = "otel")]
        {
            let (provider, layer, endpoint) = otel::start()?;
            ENABLED.store(true, Ordering::Relaxed);
            Ok((
                Self {
                    provider: Some(provider),
                    endpoint: Some(endpoint),
                    ignored: otel::ignored(),
                },
                Some(layer),
            ))
        }
        #[cfg(not(feature = "otel"))]
        {
            anyhow::bail!(
                "--otel / IDEMGATE_OTEL: this idemgate was built without the `otel` feature"
            )
        }
    }

    /// Logs whether traces are exported, and where to (after the subscriber is installed).
    pub fn log_start(&self, args: &OtelArgs) {
        match &self.endpoint {
            Some(endpoint) => {
                tracing::info!(
                    endpoint = %endpoint,
                    "exporting traces over OTLP/HTTP (batched; flushed at shutdown)"
                );
                for ignored in &self.ignored {
                    tracing::warn!("{ignored}");
                }
            }
            None if args.enabled => {
                tracing::info!("OTEL_SDK_DISABLED=true: traces are not exported despite --otel")
            }
            None => {}
        }
    }

    /// Exports the spans still queued (at most 5 s), then stops the exporter. Call it once the
    /// proxy has drained, outside the async runtime (it blocks).
    pub fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider {
            // The SDK logs failed exports itself (and the spans it dropped on a full queue).
            match provider.shutdown_with_timeout(std::time::Duration::from_secs(5)) {
                Ok(()) => tracing::info!("trace export stopped"),
                Err(e) => tracing::warn!(error = %e, "stopping the trace export failed"),
            }
        }
    }
}

/// Installs the global subscriber with OpenTelemetry: the log lines as [`crate::init_logs`]
/// writes them (filtered by `IDEMGATE_LOG`), and `layer` (our spans, and warnings inside them,
/// whatever `IDEMGATE_LOG` says).
#[cfg(feature = "otel")]
pub fn init_logs(filter: tracing_subscriber::EnvFilter, ansi: bool, json: bool, layer: Layer) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt: Layer = if json {
        fmt.json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    tracing_subscriber::registry().with(vec![fmt, layer]).init();
}

/// Without the `otel` feature there is no [`Layer`] to install.
#[cfg(not(feature = "otel"))]
pub fn init_logs(_: tracing_subscriber::EnvFilter, _: bool, _: bool, layer: Layer) {
    match layer {}
}

/// The value of the environment variable `name`, if set and not blank.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

#[cfg(feature = "otel")]
pub use otel::{AdoptTraceparentLayer, PropagateLayer};

/// The layer in front of the tower layer: [`AdoptTraceparentLayer`] when traces are exported,
/// nothing otherwise.
#[cfg(feature = "otel")]
pub fn adopt_traceparent()
-> tower::util::Either<AdoptTraceparentLayer, tower::layer::util::Identity> {
    tower::util::option_layer(enabled().then_some(AdoptTraceparentLayer))
}

/// The layer in front of the upstream client: [`PropagateLayer`] when traces are exported,
/// nothing otherwise.
#[cfg(feature = "otel")]
pub fn propagate() -> tower::util::Either<PropagateLayer, tower::layer::util::Identity> {
    tower::util::option_layer(enabled().then_some(PropagateLayer))
}

/// Without the `otel` feature: nothing.
#[cfg(not(feature = "otel"))]
pub fn adopt_traceparent() -> tower::layer::util::Identity {
    tower::layer::util::Identity::new()
}

/// Without the `otel` feature: nothing.
#[cfg(not(feature = "otel"))]
pub fn propagate() -> tower::layer::util::Identity {
    tower::layer::util::Identity::new()
}

#[cfg(feature = "otel")]
mod otel {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use anyhow::{Context as _, bail};
    use http::header::{HeaderMap, HeaderName, HeaderValue};
    use http::{Request, Response};
    use idemgate_tower::body::{BoxError, IdemBody};
    use idemgate_tower::upstream::UpstreamError;
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::{Key, KeyValue};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::{Resource, resource::ResourceDetector};
    use tracing::Instrument;
    use tracing::subscriber::Interest;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer as _;

    use super::{Layer, env};

    /// The OTLP/HTTP endpoint when no variable names one (the OTLP default).
    const DEFAULT_ENDPOINT: &str = "http://localhost:4318";

    /// The exporter, the subscriber layer and the endpoint (for the log line).
    pub(super) fn start() -> anyhow::Result<(SdkTracerProvider, Layer, String)> {
        check_environment()?;
        let endpoint = endpoint()?;
        // The exporter reads OTEL_EXPORTER_OTLP_{TRACES_,}{ENDPOINT,HEADERS,TIMEOUT,COMPRESSION}.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .context("starting the OTLP trace exporter")?;
        // The sampler comes from OTEL_TRACES_SAMPLER/_ARG (default parentbased_always_on), the
        // batch settings from OTEL_BSP_*, the span limits from OTEL_SPAN_*_COUNT_LIMIT.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            .build();
        let tracer = provider.tracer("idemgate");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // Only what the spans are about: no thread, source-location or busy/idle attributes.
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(
                // A store span outside any request (the sweeper's, the completion feed's) would
                // be a trace of its own every few seconds: left out.
                tracing_subscriber::filter::dynamic_filter_fn(|meta, cx| {
                    meta.name() != "store" || cx.lookup_current().is_some()
                })
                .with_callsite_filter(|meta| {
                    // Our spans (whatever IDEMGATE_LOG says), and warnings and errors inside
                    // them as span events; never the SDK's own diagnostics.
                    if meta.is_span()
                        && *meta.level() <= tracing::Level::DEBUG
                        && meta.target().starts_with("idemgate")
                    {
                        if meta.name() == "store" {
                            Interest::sometimes()
                        } else {
                            Interest::always()
                        }
                    } else if meta.is_event()
                        && *meta.level() <= tracing::Level::WARN
                        && !meta.target().starts_with("opentelemetry")
                    {
                        Interest::always()
                    } else {
                        Interest::never()
                    }
                })
                .with_max_level_hint(tracing::level_filters::LevelFilter::DEBUG),
            )
            .boxed();
        Ok((provider, layer, endpoint))
    }

    /// Refuses settings this build cannot honour, rather than sending what the collector does
    /// not expect.
    fn check_environment() -> anyhow::Result<()> {
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = env(name) {
                if !protocol.trim().eq_ignore_ascii_case("http/protobuf") {
                    bail!(
                        "{name}={protocol}: idemgate exports traces over OTLP/HTTP with protobuf \
                         only (http/protobuf, usually port 4318)"
                    );
                }
                break; // the traces variable wins over the general one
            }
        }
        if let Some(exporter) = env("OTEL_TRACES_EXPORTER")
            && !exporter.trim().eq_ignore_ascii_case("otlp")
        {
            bail!(
                "OTEL_TRACES_EXPORTER={exporter}: with --otel, idemgate exports over otlp only \
                 (leave out --otel for no traces)"
            );
        }
        Ok(())
    }

    /// Settings the exporter would pass over in silence.
    pub(super) fn ignored() -> Vec<String> {
        let mut ignored = Vec::new();
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ] {
            if let Some(v) = env(name) {
                if !v.trim().eq_ignore_ascii_case("none") {
                    ignored.push(format!(
                        "{name}={v} ignored: this build sends spans uncompressed"
                    ));
                }
                break;
            }
        }
        // The SDK's own warnings about these come before the logs are up: said again here.
        if let Some(sampler) = env("OTEL_TRACES_SAMPLER") {
            let ratio = env("OTEL_TRACES_SAMPLER_ARG").and_then(|a| a.trim().parse::<f64>().ok());
            match sampler.as_str() {
                "always_on" | "always_off" | "parentbased_always_on" | "parentbased_always_off" => {
                }
                "traceidratio" | "parentbased_traceidratio" if ratio.is_none() => {
                    ignored.push(format!(
                        "OTEL_TRACES_SAMPLER={sampler} without a number in \
                         OTEL_TRACES_SAMPLER_ARG: every trace is sampled (ratio 1.0)"
                    ));
                }
                "traceidratio" | "parentbased_traceidratio" => {}
                _ => ignored.push(format!(
                    "OTEL_TRACES_SAMPLER={sampler} is not a sampler the SDK knows \
                     (always_on, always_off, traceidratio, parentbased_always_on, \
                     parentbased_always_off, parentbased_traceidratio): parentbased_always_on"
                )),
            }
        }
        if let Some(v) = env("OTEL_PROPAGATORS")
            && v.split(',')
                .any(|p| !p.trim().eq_ignore_ascii_case("tracecontext"))
        {
            ignored.push(format!(
                "OTEL_PROPAGATORS={v} ignored: idemgate reads and sends W3C traceparent and \
                 tracestate (tracecontext) only"
            ));
        }
        ignored
    }

    /// `service.name` `idemgate` and `service.version` this build's, unless
    /// `OTEL_RESOURCE_ATTRIBUTES` says otherwise; `OTEL_SERVICE_NAME` over both (the
    /// specification's order); and the SDK's `telemetry.sdk.*`.
    fn resource() -> Resource {
        let mut builder = Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "idemgate"),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .with_attributes(
                TelemetryResourceDetector
                    .detect()
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_attributes(
                EnvResourceDetector::new()
                    .detect()
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            );
        if let Some(name) = env("OTEL_SERVICE_NAME") {
            builder =
                builder.with_attribute(KeyValue::new(Key::from_static_str("service.name"), name));
        }
        builder.build()
    }

    /// Where the exporter sends spans, as it resolves it, for the log line (without user
    /// information or query, which may hold credentials). Refuses `https`: this build has no TLS
    /// client for the exporter (a collector or agent on the host or beside it forwards over TLS).
    fn endpoint() -> anyhow::Result<String> {
        let (name, url) = match env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(url) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url),
            None => {
                let base =
                    env("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or(DEFAULT_ENDPOINT.to_owned());
                let url = format!("{}/v1/traces", base.trim_end_matches('/'));
                ("OTEL_EXPORTER_OTLP_ENDPOINT", url)
            }
        };
        let uri = url
            .trim()
            .parse::<http::Uri>()
            .map_err(|e| anyhow::anyhow!("{name}: not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!(
                "{name}: https is not supported by this build's OTLP exporter (plain http only: \
                 send to a collector or agent on the host, which can forward over TLS)"
            ),
            _ => bail!("{name}: an http:// URL is needed"),
        }
        let port = uri.port().map_or(String::new(), |p| format!(":{p}"));
        Ok(format!(
            "http://{}{port}{}",
            uri.host().unwrap_or(""),
            uri.path()
        ))
    }

    /// A request's headers, read by the W3C propagator.
    struct Headers<'a>(&'a HeaderMap);

    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(HeaderName::as_str).collect()
        }
    }

    /// A request's headers, written by the W3C propagator: `traceparent` replaced; `tracestate`
    /// replaced, or removed when ours is empty (a stale one belongs to another parent).
    struct HeadersMut<'a>(&'a mut HeaderMap);

    impl Injector for HeadersMut<'_> {
        fn set(&mut self, key: &str, value: String) {
            let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
                return;
            };
            match HeaderValue::from_str(&value) {
                Ok(v) if !value.is_empty() => {
                    self.0.insert(name, v);
                }
                _ => {
                    self.0.remove(name);
                }
            }
        }
    }

    /// Adds [`AdoptTraceparent`].
    #[derive(Clone, Copy, Debug, Default)]
    pub struct AdoptTraceparentLayer;

    impl<S> tower::Layer<S> for AdoptTraceparentLayer {
        type Service = AdoptTraceparent<S>;

        fn layer(&self, inner: S) -> Self::Service {
            AdoptTraceparent { inner }
        }
    }

    /// Makes the client's W3C `traceparent` (and `tracestate`) the parent of the request's span:
    /// the extracted context is the current one while the inner service's `call` runs, which is
    /// where the tower layer opens the span. Without a valid `traceparent` the span starts a new
    /// trace.
    #[derive(Clone, Debug)]
    pub struct AdoptTraceparent<S> {
        inner: S,
    }

    impl<S, B> tower::Service<Request<B>> for AdoptTraceparent<S>
    where
        S: tower::Service<Request<B>>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, req: Request<B>) -> S::Future {
            let parent = TraceContextPropagator::new().extract(&Headers(req.headers()));
            let _current = parent.attach();
            self.inner.call(req)
        }
    }

    /// Adds [`Propagate`].
    #[derive(Clone, Copy, Debug, Default)]
    pub struct PropagateLayer;

    impl<S> tower::Layer<S> for PropagateLayer {
        type Service = Propagate<S>;

        fn layer(&self, inner: S) -> Self::Service {
            Propagate { inner }
        }
    }

    /// Opens the `upstream` span (a child of the request's, until the upstream's response head)
    /// and sends its W3C `traceparent` upstream, in place of the client's.
    #[derive(Clone, Debug)]
    pub struct Propagate<S> {
        inner: S,
    }

    impl<S, ResB> tower::Service<Request<IdemBody>> for Propagate<S>
    where
        S: tower::Service<Request<IdemBody>, Response = Response<ResB>, Error = BoxError>,
        S::Future: Send + 'static,
        ResB: Send + 'static,
    {
        type Response = Response<ResB>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<Response<ResB>, BoxError>> + Send>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, mut req: Request<IdemBody>) -> Self::Future {
            let span = tracing::debug_span!("upstream",
                otel.name = %format_args!("{} upstream", req.method()),
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                http.request.method = %req.method(),
                url.path = %req.uri().path(),
                http.response.status_code = tracing::field::Empty,
                error.type = tracing::field::Empty,
            );
            TraceContextPropagator::new()
                .inject_context(&span.context(), &mut HeadersMut(req.headers_mut()));
            let call = span.in_scope(|| self.inner.call(req));
            Box::pin(async move {
                let out = call.instrument(span.clone()).await;
                match &out {
                    Ok(res) => {
                        let status = res.status().as_u16();
                        span.record("http.response.status_code", status);
                        if status >= 500 {
                            span.record("otel.status_code", "ERROR");
                        }
                    }
                    Err(e) => {
                        span.record("otel.status_code", "ERROR");
                        let cause = e
                            .downcast_ref::<UpstreamError>()
                            .map_or("other", |e| e.cause().slug());
                        span.record("error.type", cause);
                    }
                }
                out
            })
        }
    }
}
