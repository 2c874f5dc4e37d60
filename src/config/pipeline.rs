//! Pipelines: `pipelines/<name>.toml`, which recipe, which provider and ledger, and the ordered stages with their
//! gates and deploy targets.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{
    aws_shape, check_name, name_problem, parse_duration, toml_stems, ConfigError, Repo, RepoPath, Source, IMAGES_DIR,
    PIPELINES_DIR,
};

const DEFAULT_LEDGER: &str = ".kiln/ledger";
const DEFAULT_GATE_TIMEOUT: Duration = Duration::from_secs(600);
/// Short, because a holder on another machine (a CI runner) is only known dead by its lease running out; the
/// holder renews it while it works, so a deployment may take far longer than this.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(120);
const DEFAULT_VERIFY_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PipelineToml {
    image: Spanned<String>,
    provider: Option<Spanned<String>>,
    ledger: Option<Spanned<String>>,
    aws: Option<Spanned<AwsPipelineToml>>,
    #[serde(rename = "stage", default)]
    stages: Vec<Spanned<StageToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AwsPipelineToml {
    region: Option<Spanned<String>>,
    artifact_bucket: Option<Spanned<String>>,
    profile: Option<Spanned<String>>,
    builder_subnet: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StageToml {
    name: Spanned<String>,
    capacity: Option<Spanned<u32>>,
    keep_previous: Option<u32>,
    ready_timeout: Option<Spanned<String>>,
    lease: Option<Spanned<String>>,
    deploy: Option<Spanned<DeployToml>>,
    #[serde(rename = "gate", default)]
    gates: Vec<Spanned<GateToml>>,
    verify_for: Option<Spanned<String>>,
    #[serde(rename = "verify", default)]
    verify: Vec<Spanned<VerifyToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct VerifyToml {
    command: Option<Spanned<Vec<String>>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    alarm: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct DeployToml {
    port: Option<Spanned<u16>>,
    target_group_arn: Option<Spanned<String>>,
    subnets: Option<Spanned<Vec<String>>>,
    instance_type: Option<Spanned<String>>,
    regions: Option<Spanned<Vec<Spanned<String>>>>,
    accounts: Option<Spanned<Vec<Spanned<String>>>>,
    security_groups: Option<Spanned<Vec<String>>>,
    instance_profile: Option<Spanned<String>>,
}

impl DeployToml {
    /// The first AWS key set, with where it is: a local stage names it in its error.
    fn first_aws_key(&self) -> Option<(&'static str, std::ops::Range<usize>)> {
        [
            self.target_group_arn.as_ref().map(|v| ("target-group-arn", v.span())),
            self.subnets.as_ref().map(|v| ("subnets", v.span())),
            self.instance_type.as_ref().map(|v| ("instance-type", v.span())),
            self.regions.as_ref().map(|v| ("regions", v.span())),
            self.accounts.as_ref().map(|v| ("accounts", v.span())),
            self.security_groups.as_ref().map(|v| ("security-groups", v.span())),
            self.instance_profile.as_ref().map(|v| ("instance-profile", v.span())),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(_, span)| span.start)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct GateToml {
    soak: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    timeout: Option<Spanned<String>>,
    approvals: Option<Spanned<u32>>,
    approvers: Option<Spanned<Vec<Spanned<String>>>>,
    distinct_from_promoter: Option<Spanned<bool>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    Local,
    Aws,
}

/// Where the ledger lives: a directory (relative paths are taken from the repository root) or `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerLocation {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: RepoPath,
    pub image: String,
    pub provider: ProviderKind,
    pub ledger: LedgerLocation,
    pub aws: Option<AwsPipeline>,
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone)]
pub struct AwsPipeline {
    pub region: Option<String>,
    pub artifact_bucket: Option<String>,
    pub profile: Option<String>,
    /// Where bake builders run; absent: the region's default VPC.
    pub builder_subnet: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub capacity: u32,
    pub keep_previous: u32,
    pub ready_timeout: Option<Duration>,
    pub lease: Duration,
    pub deploy: StageDeploy,
    pub gates: Vec<Gate>,
    /// The verification window after traffic moves: the previous group keeps running while `verify` checks run.
    pub verify_for: Option<Duration>,
    pub verify: Vec<VerifyCheck>,
}

/// A check run through a stage's verification window; any failure moves traffic back to the previous group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyCheck {
    /// Runs at once after cutover, then every `interval`, with `KILN_ENDPOINT` set; non-zero exit fails.
    Command { argv: Vec<String>, program: CommandProgram, interval: Duration, timeout: Duration },
    /// AWS: a CloudWatch alarm that must stay OK through the window.
    Alarm { name: String },
}

impl Stage {
    /// The regions the stage runs in (AWS `deploy.regions`); empty means the pipeline's own region, and always
    /// for the local provider.
    pub fn regions(&self) -> &[String] {
        match &self.deploy {
            StageDeploy::Aws { regions, .. } => regions,
            StageDeploy::Local { .. } => &[],
        }
    }

    /// The accounts the stage's images are shared with (AWS `deploy.accounts`); empty for the local provider.
    pub fn accounts(&self) -> &[String] {
        match &self.deploy {
            StageDeploy::Aws { accounts, .. } => accounts,
            StageDeploy::Local { .. } => &[],
        }
    }
}

#[derive(Debug, Clone)]
pub enum StageDeploy {
    Local {
        port: u16,
    },
    Aws {
        target_group_arn: Option<String>,
        subnets: Vec<String>,
        instance_type: Option<String>,
        regions: Vec<String>,
        accounts: Vec<String>,
        security_groups: Vec<String>,
        /// The instance profile the stage's instances run with (its role is what the service may do in AWS).
        instance_profile: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Soak {
        duration: Duration,
        written: String,
    },
    Command {
        argv: Vec<String>,
        program: CommandProgram,
        timeout: Duration,
    },
    /// `distinct_from_promoter`: an approval by the actor who runs the promotion does not count.
    Approvals {
        count: u32,
        approvers: Vec<String>,
        distinct_from_promoter: bool,
    },
}

/// A command gate's program: a repository script (the argument has a `/`) or a program looked up on `PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandProgram {
    Script(RepoPath),
    OnPath(String),
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    pub fn stage_names(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.name.as_str()).collect()
    }
}

impl LedgerLocation {
    /// Parses a ledger URL as written in a pipeline, `--ledger` or `KILN_LEDGER`.
    pub fn parse(repo: &Repo, written: &str) -> Result<LedgerLocation, String> {
        if let Some(rest) = written.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("`{written}` names no bucket; write s3://bucket/prefix"));
            }
            return Ok(LedgerLocation::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() });
        }
        if let Some((scheme, _)) = written.split_once("://") {
            return Err(format!("ledger scheme `{scheme}://` is not supported; use a directory or s3://bucket/prefix"));
        }
        if written.trim().is_empty() {
            return Err("the ledger location is empty".into());
        }
        let path = PathBuf::from(written);
        Ok(LedgerLocation::Dir(if path.is_absolute() { path } else { repo.root().join(path) }))
    }

    pub fn default_for(repo: &Repo) -> LedgerLocation {
        LedgerLocation::Dir(repo.root().join(DEFAULT_LEDGER))
    }
}

impl std::fmt::Display for LedgerLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LedgerLocation::Dir(path) => write!(f, "{}", path.display()),
            LedgerLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Finds the pipeline to use: the one named, or the only one in `pipelines/`.
pub fn choose(repo: &Repo, name: Option<&str>) -> Result<String, ConfigError> {
    let dir = repo.root().join(PIPELINES_DIR);
    if let Some(name) = name {
        return Ok(name.to_string());
    }
    let available = toml_stems(&dir);
    match available.len() {
        0 => Err(ConfigError::NoPipeline { dir: repo.display(&dir) }),
        1 => Ok(available[0].clone()),
        _ => Err(ConfigError::AmbiguousPipeline { dir: repo.display(&dir), available }),
    }
}

pub fn load(repo: &Repo, name: &str) -> Result<Pipeline, ConfigError> {
    check_name("pipeline", name)?;
    let dir = repo.root().join(PIPELINES_DIR);
    let path = dir.join(format!("{name}.toml"));
    if !path.is_file() {
        return Err(ConfigError::NotFound {
            kind: "pipeline",
            name: name.to_string(),
            file: repo.display(&path),
            available: toml_stems(&dir),
        });
    }
    let source = Source::read(repo, &path)?;
    let raw: PipelineToml = source.parse()?;
    validate(repo, &source, name, raw)
}

fn validate(repo: &Repo, source: &Source, name: &str, raw: PipelineToml) -> Result<Pipeline, ConfigError> {
    let file = repo.resolve(&source.absolute, &format!("{name}.toml")).map_err(|m| source.error(0..0, "(file)", m))?;
    let image = raw.image.get_ref().clone();
    if let Some(problem) = name_problem(&image) {
        return Err(source.error(
            raw.image.span(),
            "image",
            format!("`{}` is not a valid recipe name: {problem}", image.escape_debug()),
        ));
    }
    if !repo.root().join(IMAGES_DIR).join(format!("{image}.toml")).is_file() {
        let available = toml_stems(&repo.root().join(IMAGES_DIR));
        let hint = if available.is_empty() { String::new() } else { format!("; recipes: {}", available.join(", ")) };
        return Err(source.error(
            raw.image.span(),
            "image",
            format!("recipe `{image}` does not exist (no {IMAGES_DIR}/{image}.toml){hint}"),
        ));
    }
    let provider = match raw.provider.as_ref().map(|p| (p.get_ref().as_str(), p.span())) {
        None | Some(("local", _)) => ProviderKind::Local,
        Some(("aws", _)) => ProviderKind::Aws,
        Some((other, span)) => {
            return Err(source.error(
                span,
                "provider",
                format!("unknown provider `{other}`; expected \"local\" or \"aws\""),
            ))
        }
    };
    let aws = validate_aws(source, provider, raw.aws)?;
    let ledger = match &raw.ledger {
        Some(l) => LedgerLocation::parse(repo, l.get_ref()).map_err(|m| source.error(l.span(), "ledger", m))?,
        None => LedgerLocation::default_for(repo),
    };
    if raw.stages.is_empty() {
        return Err(source.error(0..0, "stage", "a pipeline needs at least one [[stage]]"));
    }

    let mut stages = Vec::with_capacity(raw.stages.len());
    let mut names = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for (index, stage) in raw.stages.into_iter().enumerate() {
        let stage_span = stage.span();
        let stage = stage.into_inner();
        let field = format!("stage[{index}]");
        let stage_name = stage.name.get_ref().clone();
        let name_ok = !stage_name.is_empty()
            && stage_name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !stage_name.starts_with('-');
        if !name_ok {
            return Err(source.error(
                stage.name.span(),
                format!("{field}.name"),
                format!("`{stage_name}` is not a stage name: use lowercase letters, digits and `-`"),
            ));
        }
        if !names.insert(stage_name.clone()) {
            return Err(source.error(
                stage.name.span(),
                format!("{field}.name"),
                format!("stage `{stage_name}` is defined twice; stage names must be unique"),
            ));
        }
        let capacity = match &stage.capacity {
            Some(c) if *c.get_ref() == 0 => {
                return Err(source.error(c.span(), format!("{field}.capacity"), "capacity must be at least 1"))
            }
            Some(c) => *c.get_ref(),
            None => 1,
        };
        let ready_timeout = stage
            .ready_timeout
            .as_ref()
            .map(|t| {
                parse_duration(t.get_ref()).map_err(|m| source.error(t.span(), format!("{field}.ready-timeout"), m))
            })
            .transpose()?;
        let lease = match &stage.lease {
            Some(t) => parse_duration(t.get_ref()).map_err(|m| source.error(t.span(), format!("{field}.lease"), m))?,
            None => DEFAULT_LEASE,
        };
        let deploy = match (provider, stage.deploy) {
            (ProviderKind::Local, None) => {
                return Err(source.error(
                    stage_span,
                    format!("{field}.deploy"),
                    "a local stage needs `deploy = { port = N }`, its stable proxy port",
                ))
            }
            (ProviderKind::Local, Some(deploy)) => {
                let span = deploy.span();
                let deploy = deploy.into_inner();
                if let Some((key, at)) = deploy.first_aws_key() {
                    return Err(source.error(
                        at,
                        format!("{field}.deploy.{key}"),
                        format!("`{key}` is for provider = \"aws\"; this pipeline's provider is \"local\""),
                    ));
                }
                let port = deploy.port.ok_or_else(|| {
                    source.error(
                        span.clone(),
                        format!("{field}.deploy.port"),
                        "a local stage needs `port`, its stable proxy port",
                    )
                })?;
                if *port.get_ref() < 1024 {
                    return Err(source.error(
                        port.span(),
                        format!("{field}.deploy.port"),
                        format!("port {} is privileged; use 1024–65535", port.get_ref()),
                    ));
                }
                if !ports.insert(*port.get_ref()) {
                    return Err(source.error(
                        port.span(),
                        format!("{field}.deploy.port"),
                        format!("port {} is used by another stage", port.get_ref()),
                    ));
                }
                StageDeploy::Local { port: *port.get_ref() }
            }
            (ProviderKind::Aws, deploy) => validate_aws_deploy(source, &field, stage_span.clone(), deploy)?,
        };
        let mut gates = Vec::with_capacity(stage.gates.len());
        for (gate_index, gate) in stage.gates.into_iter().enumerate() {
            let gate_field = format!("{field}.gate[{gate_index}]");
            gates.push(validate_gate(repo, source, &gate_field, gate)?);
        }
        let verify_for = stage
            .verify_for
            .as_ref()
            .map(|t| parse_duration(t.get_ref()).map_err(|m| source.error(t.span(), format!("{field}.verify-for"), m)))
            .transpose()?;
        let mut verify = Vec::with_capacity(stage.verify.len());
        for (check_index, check) in stage.verify.into_iter().enumerate() {
            let check_field = format!("{field}.verify[{check_index}]");
            verify.push(validate_verify(repo, source, &check_field, provider, check)?);
        }
        if verify_for.is_none() && !verify.is_empty() {
            return Err(source.error(
                stage_span,
                format!("{field}.verify-for"),
                "[[stage.verify]] checks need `verify-for`, the length of the window they run in",
            ));
        }
        stages.push(Stage {
            name: stage_name,
            capacity,
            keep_previous: stage.keep_previous.unwrap_or(1),
            ready_timeout,
            lease,
            deploy,
            gates,
            verify_for,
            verify,
        });
    }
    if provider == ProviderKind::Aws {
        // A recipe that does not load is reported, at its own location, by the command that bakes it; what the
        // pipeline adds is only that its provider needs a base image.
        if let Some(root) = super::recipe::load_chain(repo, &image).ok().and_then(|chain| chain.into_iter().next()) {
            super::recipe::require_aws_base(repo, &root, name)?;
        }
    }
    Ok(Pipeline { name: name.to_string(), file, image, provider, ledger, aws, stages })
}

/// The pipeline's `[aws]` table. The aws provider needs it, with `region` and `artifact-bucket`. A local pipeline
/// may keep its ledger in S3 (in the file, `--ledger` or `KILN_LEDGER`), whose client takes `region` and `profile`
/// from here; the provider's own keys would be ignored there, so they are refused.
fn validate_aws(
    source: &Source,
    provider: ProviderKind,
    raw: Option<Spanned<AwsPipelineToml>>,
) -> Result<Option<AwsPipeline>, ConfigError> {
    let Some(raw) = raw else {
        if provider == ProviderKind::Aws {
            return Err(source.error(
                0..0,
                "aws",
                "the aws provider needs an [aws] table with `region` and `artifact-bucket`",
            ));
        }
        return Ok(None);
    };
    let span = raw.span();
    if provider == ProviderKind::Local {
        let raw = raw.into_inner();
        let provider_only = [("artifact-bucket", &raw.artifact_bucket), ("builder-subnet", &raw.builder_subnet)];
        if let Some((key, value)) = provider_only.into_iter().find_map(|(key, value)| value.as_ref().map(|v| (key, v)))
        {
            return Err(source.error(
                value.span(),
                format!("aws.{key}"),
                format!(
                    "`{key}` is for provider = \"aws\"; a local pipeline would ignore it (its [aws] holds only \
                     `region` and `profile`, for an s3:// ledger)"
                ),
            ));
        }
        if let Some(region) = &raw.region {
            aws_shape::region(region.get_ref()).map_err(|m| source.error(region.span(), "aws.region", m))?;
        }
        check_profile(source, &raw.profile)?;
        return Ok(Some(AwsPipeline {
            region: raw.region.map(Spanned::into_inner),
            artifact_bucket: None,
            profile: raw.profile.map(Spanned::into_inner),
            builder_subnet: None,
        }));
    }
    let raw = raw.into_inner();
    let region = raw.region.ok_or_else(|| {
        source.error(span.clone(), "aws.region", "the aws provider needs `region`, like \"us-east-1\"")
    })?;
    aws_shape::region(region.get_ref()).map_err(|m| source.error(region.span(), "aws.region", m))?;
    let bucket = raw.artifact_bucket.ok_or_else(|| {
        source.error(
            span.clone(),
            "aws.artifact-bucket",
            "the aws provider needs `artifact-bucket`, the S3 bucket that stages provisioning files for the builder",
        )
    })?;
    aws_shape::bucket(bucket.get_ref()).map_err(|m| source.error(bucket.span(), "aws.artifact-bucket", m))?;
    if let Some(subnet) = &raw.builder_subnet {
        aws_shape::resource_id(subnet.get_ref(), "subnet", "a subnet id")
            .map_err(|m| source.error(subnet.span(), "aws.builder-subnet", m))?;
    }
    check_profile(source, &raw.profile)?;
    Ok(Some(AwsPipeline {
        region: Some(region.into_inner()),
        artifact_bucket: Some(bucket.into_inner()),
        profile: raw.profile.map(Spanned::into_inner),
        builder_subnet: raw.builder_subnet.map(Spanned::into_inner),
    }))
}

fn check_profile(source: &Source, profile: &Option<Spanned<String>>) -> Result<(), ConfigError> {
    match profile {
        Some(profile) if profile.get_ref().trim().is_empty() => Err(source.error(
            profile.span(),
            "aws.profile",
            "the profile is empty; name one from ~/.aws/config, or leave `profile` out",
        )),
        _ => Ok(()),
    }
}

/// An AWS stage's `deploy` table.
fn validate_aws_deploy(
    source: &Source,
    field: &str,
    stage_span: std::ops::Range<usize>,
    deploy: Option<Spanned<DeployToml>>,
) -> Result<StageDeploy, ConfigError> {
    let Some(deploy) =
        deploy.map(Spanned::into_inner).filter(|d| d.subnets.as_ref().is_some_and(|s| !s.get_ref().is_empty()))
    else {
        return Err(source.error(
            stage_span,
            format!("{field}.deploy.subnets"),
            "an AWS stage needs `subnets` for its Auto Scaling groups",
        ));
    };
    if let Some(port) = deploy.port {
        return Err(source.error(port.span(), format!("{field}.deploy.port"), "`port` is for the local provider"));
    }
    if let Some(instance_type) = &deploy.instance_type {
        aws_shape::instance_type(instance_type.get_ref())
            .map_err(|m| source.error(instance_type.span(), format!("{field}.deploy.instance-type"), m))?;
    }
    if let Some(profile) = deploy.instance_profile.as_ref().filter(|p| p.get_ref().trim().is_empty()) {
        return Err(source.error(
            profile.span(),
            format!("{field}.deploy.instance-profile"),
            "the instance profile name is empty; name one, or leave the key out to run without one",
        ));
    }
    let regions = checked_list(source, &format!("{field}.deploy.regions"), deploy.regions, aws_shape::region)?;
    let accounts = checked_list(source, &format!("{field}.deploy.accounts"), deploy.accounts, aws_shape::account)?;
    Ok(StageDeploy::Aws {
        target_group_arn: deploy.target_group_arn.map(Spanned::into_inner),
        subnets: deploy.subnets.map(Spanned::into_inner).unwrap_or_default(),
        instance_type: deploy.instance_type.map(Spanned::into_inner),
        regions,
        accounts,
        security_groups: deploy.security_groups.map(Spanned::into_inner).unwrap_or_default(),
        instance_profile: deploy.instance_profile.map(Spanned::into_inner),
    })
}

/// A list whose every entry passes `check` and appears once; errors point at the entry, as `field[i]`.
fn checked_list(
    source: &Source,
    field: &str,
    list: Option<Spanned<Vec<Spanned<String>>>>,
    check: fn(&str) -> Result<(), String>,
) -> Result<Vec<String>, ConfigError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (index, entry) in list.map(Spanned::into_inner).unwrap_or_default().into_iter().enumerate() {
        check(entry.get_ref()).map_err(|m| source.error(entry.span(), format!("{field}[{index}]"), m))?;
        if !seen.insert(entry.get_ref().clone()) {
            return Err(source.error(
                entry.span(),
                format!("{field}[{index}]"),
                format!("`{}` is listed twice", entry.get_ref()),
            ));
        }
        out.push(entry.into_inner());
    }
    Ok(out)
}

fn validate_verify(
    repo: &Repo,
    source: &Source,
    field: &str,
    provider: ProviderKind,
    check: Spanned<VerifyToml>,
) -> Result<VerifyCheck, ConfigError> {
    let span = check.span();
    let check = check.into_inner();
    match (check.command, check.alarm) {
        (Some(command), None) => {
            let (argv, program) = command_program(repo, source, &format!("{field}.command"), &command)?;
            let interval = match &check.interval {
                Some(t) => {
                    parse_duration(t.get_ref()).map_err(|m| source.error(t.span(), format!("{field}.interval"), m))?
                }
                None => DEFAULT_VERIFY_INTERVAL,
            };
            if interval.is_zero() {
                let at = check.interval.as_ref().map(|t| t.span()).unwrap_or(span);
                return Err(source.error(at, format!("{field}.interval"), "the interval must be longer than 0s"));
            }
            let timeout = match &check.timeout {
                Some(t) => {
                    parse_duration(t.get_ref()).map_err(|m| source.error(t.span(), format!("{field}.timeout"), m))?
                }
                None => interval,
            };
            Ok(VerifyCheck::Command { argv, program, interval, timeout })
        }
        (None, Some(alarm)) => {
            if provider != ProviderKind::Aws {
                return Err(source.error(
                    alarm.span(),
                    format!("{field}.alarm"),
                    "`alarm` checks are CloudWatch alarms and need provider = \"aws\"; use `command` locally",
                ));
            }
            for (key, value) in [("interval", &check.interval), ("timeout", &check.timeout)] {
                if let Some(value) = value {
                    return Err(source.error(
                        value.span(),
                        format!("{field}.{key}"),
                        format!("`{key}` goes with `command`; an alarm is watched for the whole window"),
                    ));
                }
            }
            Ok(VerifyCheck::Alarm { name: alarm.into_inner() })
        }
        _ => Err(source.error(span, field, "a verify check needs exactly one of `command` or `alarm`")),
    }
}

/// A command as written in a gate or check: its argv, and whether the program is a repository script.
fn command_program(
    repo: &Repo,
    source: &Source,
    field: &str,
    command: &Spanned<Vec<String>>,
) -> Result<(Vec<String>, CommandProgram), ConfigError> {
    let argv = command.get_ref().clone();
    let Some(first) = argv.first().filter(|p| !p.trim().is_empty()) else {
        return Err(source.error(command.span(), field, "the command is empty; give the program and its arguments"));
    };
    let program = if first.contains('/') {
        let script = repo.resolve(&source.absolute, first).map_err(|m| source.error(command.span(), field, m))?;
        CommandProgram::Script(script)
    } else {
        CommandProgram::OnPath(first.clone())
    };
    Ok((argv, program))
}

fn validate_gate(repo: &Repo, source: &Source, field: &str, gate: Spanned<GateToml>) -> Result<Gate, ConfigError> {
    let span = gate.span();
    let gate = gate.into_inner();
    let kinds = [gate.soak.is_some(), gate.command.is_some(), gate.approvals.is_some()];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(source.error(span, field, "a gate needs exactly one of `soak`, `command` or `approvals`"));
    }
    if let (Some(approvers), None) = (&gate.approvers, &gate.approvals) {
        return Err(source.error(approvers.span(), format!("{field}.approvers"), "`approvers` goes with `approvals`"));
    }
    if let (Some(distinct), None) = (&gate.distinct_from_promoter, &gate.approvals) {
        return Err(source.error(
            distinct.span(),
            format!("{field}.distinct-from-promoter"),
            "`distinct-from-promoter` goes with `approvals`",
        ));
    }
    if let (Some(timeout), None) = (&gate.timeout, &gate.command) {
        return Err(source.error(timeout.span(), format!("{field}.timeout"), "`timeout` goes with `command`"));
    }
    if let Some(soak) = gate.soak {
        let duration =
            parse_duration(soak.get_ref()).map_err(|m| source.error(soak.span(), format!("{field}.soak"), m))?;
        return Ok(Gate::Soak { duration, written: soak.get_ref().trim().to_string() });
    }
    if let Some(command) = gate.command {
        let (argv, program) = command_program(repo, source, &format!("{field}.command"), &command)?;
        let timeout = match &gate.timeout {
            Some(t) => {
                parse_duration(t.get_ref()).map_err(|m| source.error(t.span(), format!("{field}.timeout"), m))?
            }
            None => DEFAULT_GATE_TIMEOUT,
        };
        return Ok(Gate::Command { argv, program, timeout });
    }
    let approvals = gate.approvals.expect("exactly one kind is set");
    if *approvals.get_ref() == 0 {
        return Err(source.error(
            approvals.span(),
            format!("{field}.approvals"),
            "approvals must be at least 1 (remove the gate to need none)",
        ));
    }
    let mut approvers = Vec::new();
    for (index, approver) in gate.approvers.map(Spanned::into_inner).unwrap_or_default().into_iter().enumerate() {
        let name = crate::actor::check(approver.get_ref()).map_err(|reason| {
            source.error(
                approver.span(),
                format!("{field}.approvers[{index}]"),
                format!("`{}` is not a valid actor name: {reason}", approver.get_ref().escape_debug()),
            )
        })?;
        approvers.push(name);
    }
    if !approvers.is_empty() && (approvers.len() as u32) < *approvals.get_ref() {
        return Err(source.error(
            approvals.span(),
            format!("{field}.approvals"),
            format!("needs {} approvals but only {} approvers are allowed", approvals.get_ref(), approvers.len()),
        ));
    }
    let distinct_from_promoter = gate.distinct_from_promoter.is_some_and(|d| *d.get_ref());
    Ok(Gate::Approvals { count: *approvals.get_ref(), approvers, distinct_from_promoter })
}
