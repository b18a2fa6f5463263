//! The `oc`-style command line. Every verb but `serve` is an HTTP client of the engine's API,
//! as `oc` is of its API server. Arguments are checked here first, so bad usage exits 2
//! without a round trip; the engine's answer decides between 0 and 1.

mod client;
mod describe;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::core::SourceKind;
use crate::model::{ImageRef, StreamImageRef, StreamTagRef};
use client::{CliError, Client};

#[derive(Parser, Debug)]
#[command(
    name = "istream",
    version,
    about = "Image streams and image change triggers for any registry and any CI"
)]
pub struct Cli {
    /// Address of the engine's API.
    #[arg(
        long,
        global = true,
        env = "ISTREAM_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// PEM file of the CA that signed the engine's TLS certificate (for https servers).
    #[arg(long, global = true, env = "ISTREAM_CA")]
    pub certificate_authority: Option<PathBuf>,
    /// API token (sent as Authorization: Bearer).
    #[arg(long, global = true, env = "ISTREAM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Namespace of names given without one.
    #[arg(
        short = 'n',
        long,
        global = true,
        env = "ISTREAM_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Output format: wide, json or yaml (where the verb prints objects).
    #[arg(short = 'o', long = "output", global = true)]
    pub output: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the engine.
    Serve(ServeArgs),
    /// Import an image into a stream tag (and create the stream with --confirm).
    #[command(name = "import-image")]
    ImportImage(ImportArgs),
    /// Point stream tags at an image, another tag or a stream image; -d deletes tags.
    Tag(TagArgs),
    /// Show an image stream, stream tag or stream image in detail.
    Describe {
        /// is/NAME, istag/NAME:TAG or isimage/NAME@DIGEST
        what: String,
    },
    /// List image streams or stream tags.
    Get {
        /// is or istag
        kind: String,
        name: Option<String>,
    },
    /// Print tag changes as they happen.
    Watch {
        /// NAME or NAME:TAG (need not exist yet)
        name: Option<String>,
    },
    /// Show triggers; `triggers retry NAME` re-queues NAME's dead deliveries; `triggers test
    /// NAME [--tag NS/STREAM:TAG]` sends one test delivery now.
    Triggers {
        /// NAME, `retry NAME`, or `test NAME`
        args: Vec<String>,
        /// With `test`: the stream tag whose current image is sent (default: the first in `on`).
        #[arg(long, value_name = "NS/STREAM:TAG")]
        tag: Option<String>,
    },
    /// Print a shell completion script: `source <(istream completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `istream man | man -l -`.
    Man,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Config file.
    #[arg(long, env = "ISTREAM_CONFIG", default_value = "triggers.toml")]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, env = "ISTREAM_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// NAME[:TAG]
    pub name: String,
    /// The external image to import.
    #[arg(long)]
    pub from: Option<String>,
    /// Create the image stream if it does not exist.
    #[arg(long)]
    pub confirm: bool,
    /// Import every tag of the repository.
    #[arg(long)]
    pub all: bool,
    /// Keep importing periodically (only switches it on).
    #[arg(long)]
    pub scheduled: bool,
    /// Allow plain HTTP or unverified TLS (only switches it on).
    #[arg(long)]
    pub insecure: bool,
    /// Track this platform's manifest (OS/ARCH[/VARIANT]).
    #[arg(long)]
    pub platform: Option<String>,
}

#[derive(Args, Debug)]
pub struct TagArgs {
    /// Delete the given tags.
    #[arg(short = 'd', long = "delete")]
    pub delete: bool,
    /// Source kind: docker, istag or isimage (inferred as oc does when absent).
    #[arg(long, value_parser = ["docker", "istag", "isimage"])]
    pub source: Option<String>,
    /// Follow the source tag (same stream only).
    #[arg(long)]
    pub alias: bool,
    /// Import periodically (external images only).
    #[arg(long)]
    pub scheduled: bool,
    /// Allow plain HTTP or unverified TLS (external images only).
    #[arg(long)]
    pub insecure: bool,
    /// Track this platform's manifest (external images only).
    #[arg(long)]
    pub platform: Option<String>,
    /// Follow the newest tag of the REPOSITORY source: `semver:RANGE`, `numerical` or
    /// `alphabetical`.
    #[arg(long, value_name = "POLICY")]
    pub policy: Option<String>,
    /// With --policy: a regular expression a tag must match to be a candidate.
    #[arg(long, value_name = "REGEX")]
    pub filter: Option<String>,
    /// With --policy and --filter: what is compared instead of the tag (`$v`, `${v}`, `$1`).
    #[arg(long, value_name = "TEMPLATE")]
    pub extract: Option<String>,
    /// With --policy: semver pre-releases are candidates too.
    #[arg(long)]
    pub prerelease: bool,
    /// With --policy: a move waits until the candidate was seen this long (e.g. 24h).
    #[arg(long, value_name = "DURATION")]
    pub min_age: Option<String>,
    /// SOURCE DEST... (or DEST... with -d)
    #[arg(required = true)]
    pub args: Vec<String>,
}

pub fn main() -> ExitCode {
    crate::memory::limit_arenas();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Some(o) = &cli.output
        && !["wide", "json", "yaml"].contains(&o.as_str())
    {
        eprintln!("error: -o {o}: output format must be wide, json or yaml");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(CliError::Failed(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
    }
}

fn usage(m: impl std::fmt::Display) -> CliError {
    CliError::Usage(m.to_string())
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let ns = cli.namespace.clone();
    crate::model::StreamName::new(&ns, "x").map_err(|e| usage(format!("-n {ns}: {}", e.why)))?;
    let out = cli.output.clone();
    // Only the verbs that talk to the engine build a client (serve, completion and man do not).
    let client = || {
        Client::new(
            &cli.server,
            cli.token.as_deref(),
            cli.certificate_authority.as_deref(),
        )
    };
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::ImportImage(a) => {
            StreamTagRef::parse(&a.name, &ns).map_err(usage)?;
            if let Some(f) = &a.from {
                ImageRef::parse(f).map_err(|e| usage(format!("--from: {e}")))?;
            }
            if let Some(p) = &a.platform {
                crate::config::check_platform(p).map_err(|e| usage(format!("--platform: {e}")))?;
            }
            let c = client()?;
            let body = serde_json::json!({
                "name": a.name, "from": a.from, "confirm": a.confirm, "all": a.all,
                "scheduled": a.scheduled, "insecure": a.insecure, "platform": a.platform,
            });
            if a.all && out.is_none() {
                return output::import_all_progress(&c, &ns, &body).await;
            }
            let op: crate::api::OperationView = c
                .post(&format!("/api/v1/namespaces/{ns}/import"), &body)
                .await?;
            output::operation(&op, out.as_deref(), &ns, "import")
        }
        Command::Tag(a) => tag(&client()?, &ns, out.as_deref(), a).await,
        Command::Describe { what } => describe::run(&client()?, &ns, &what).await,
        Command::Get { kind, name } => {
            output::get(&client()?, &ns, &kind, name.as_deref(), out.as_deref()).await
        }
        Command::Watch { name } => {
            output::watch(&client()?, &ns, name.as_deref(), out.as_deref()).await
        }
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "istream", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .map_err(|e| CliError::Failed(format!("cannot write the man page: {e}")))
        }
        Command::Triggers { args, tag } => {
            output::triggers(&client()?, &args, tag, out.as_deref()).await
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    init_logging(&args.log_format);
    let explicit = std::env::args().any(|a| a == "--config" || a.starts_with("--config="))
        || std::env::var_os("ISTREAM_CONFIG").is_some();
    let config = crate::config::Config::load(&args.config, explicit)
        .map_err(|e| CliError::Failed(e.to_string()))?;
    crate::serve::run(config)
        .await
        .map_err(|e| CliError::Failed(format!("{e:#}")))
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: a file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if format == "json" {
        let _ = builder.json().flatten_event(true).try_init();
    } else {
        let _ = builder.try_init();
    }
}

async fn tag(c: &Client, ns: &str, out: Option<&str>, a: TagArgs) -> Result<(), CliError> {
    if a.delete {
        if a.alias || a.scheduled || a.insecure || a.source.is_some() || a.platform.is_some() {
            return Err(usage("-d takes only the tags to delete"));
        }
        for d in &a.args {
            StreamTagRef::parse(d, ns).map_err(usage)?;
        }
        for d in &a.args {
            let t = StreamTagRef::parse(d, ns).map_err(usage)?;
            c.delete(&format!(
                "/api/v1/namespaces/{}/imagestreamtags/{}:{}",
                t.stream.namespace, t.stream.name, t.tag
            ))
            .await?;
            println!("Deleted tag {}.", t.display_in(ns));
        }
        return Ok(());
    }
    if a.args.len() < 2 {
        return Err(usage(
            "tag needs SOURCE and at least one DEST (or -d DEST...)",
        ));
    }
    let source = a.args[0].clone();
    let dests = a.args[1..].to_vec();
    let policy = match &a.policy {
        Some(p) => {
            let (semver, order) = match p.split_once(':') {
                Some(("semver", r)) => (Some(r.to_string()), None),
                None if p == "numerical" || p == "alphabetical" => (None, Some(p.clone())),
                _ => {
                    return Err(usage(format!(
                        "--policy={p}: give semver:RANGE, numerical or alphabetical"
                    )));
                }
            };
            let spec = crate::model::PolicySpec {
                repository: source.clone(),
                semver,
                order,
                filter: a.filter.clone(),
                extract: a.extract.clone(),
                prerelease: a.prerelease,
                min_age: a.min_age.clone(),
            };
            crate::policy::Policy::compile(&spec)
                .map_err(|(k, e)| usage(format!("--policy ({k}): {e}")))?;
            Some(spec)
        }
        None if a.filter.is_some()
            || a.extract.is_some()
            || a.prerelease
            || a.min_age.is_some() =>
        {
            return Err(usage(
                "--filter, --extract, --prerelease and --min-age go with --policy",
            ));
        }
        None => None,
    };
    let kind = match a.source.as_deref() {
        Some("docker") => SourceKind::Docker,
        Some("istag") => SourceKind::Istag,
        Some("isimage") => SourceKind::Isimage,
        _ => crate::core::infer_source_kind(&source),
    };
    match kind {
        _ if policy.is_some() => {}
        SourceKind::Docker => {
            ImageRef::parse(&source).map_err(usage)?;
        }
        SourceKind::Istag => {
            StreamTagRef::parse(&source, ns).map_err(usage)?;
        }
        SourceKind::Isimage => {
            StreamImageRef::parse(&source, ns).map_err(usage)?;
        }
    }
    for d in &dests {
        StreamTagRef::parse(d, ns).map_err(usage)?;
    }
    if policy.is_none()
        && kind != SourceKind::Docker
        && (a.scheduled || a.insecure || a.platform.is_some())
    {
        return Err(usage(
            "--scheduled, --insecure and --platform apply only to external images (--source=docker)",
        ));
    }
    if a.alias {
        if kind != SourceKind::Istag {
            return Err(usage("--alias needs a stream tag (NAME:TAG) as the source"));
        }
        let src = StreamTagRef::parse(&source, ns).map_err(usage)?;
        for d in &dests {
            let d = StreamTagRef::parse(d, ns).map_err(usage)?;
            if d.stream != src.stream {
                return Err(usage(format!(
                    "--alias works only within one stream: {src} and {d} differ"
                )));
            }
        }
    }
    if let Some(p) = &a.platform {
        crate::config::check_platform(p).map_err(|e| usage(format!("--platform: {e}")))?;
    }
    if policy.is_some() && a.alias {
        return Err(usage("--alias does not go with --policy"));
    }
    let kind = if policy.is_some() {
        SourceKind::Docker
    } else {
        kind
    };
    let body = serde_json::json!({
        "source": source, "source_kind": kind, "dests": dests, "alias": a.alias,
        "scheduled": a.scheduled, "insecure": a.insecure, "platform": a.platform,
        "policy": policy,
    });
    let op: crate::api::OperationView = c
        .post(&format!("/api/v1/namespaces/{ns}/tag"), &body)
        .await?;
    if out.is_some() {
        return output::operation(&op, out, ns, "tag");
    }
    let mut failed = Vec::new();
    for r in &op.results {
        let name = StreamTagRef::parse(&r.tag, ns)
            .map(|t| t.display_in(ns))
            .unwrap_or(r.tag.clone());
        if r.status != "Success" {
            failed.push(format!(
                "{name}: {} ({})",
                r.message.clone().unwrap_or_default(),
                r.reason.clone().unwrap_or_default()
            ));
            continue;
        }
        match (
            kind,
            a.alias,
            r.view.as_ref().and_then(|v| v.digest.clone()),
        ) {
            (SourceKind::Istag, true, _) => println!("Tag {name} set up to track {source}."),
            (SourceKind::Docker, _, Some(d)) => println!(
                "Tag {name} set to {source} ({d}){}.",
                if a.scheduled {
                    ", importing periodically"
                } else {
                    ""
                }
            ),
            (_, _, Some(d)) => println!(
                "Tag {name} set to {}@{d}.",
                r.view
                    .as_ref()
                    .map(|v| v.stream.clone())
                    .unwrap_or_default()
            ),
            (_, _, None) => println!("Tag {name} set to {source}."),
        }
    }
    output::failures("import", &failed)
}
