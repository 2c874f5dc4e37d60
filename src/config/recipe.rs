//! Recipes: `images/<name>.toml`, how one image is built and how its instances start and prove health.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{
    aws_shape, check_name, name_problem, parse_duration, toml_stems, ConfigError, Repo, RepoPath, Source, IMAGES_DIR,
};

const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RecipeToml {
    parent: Option<Spanned<String>>,
    description: Option<String>,
    #[serde(default)]
    provision: Vec<Spanned<StepToml>>,
    instance: Option<InstanceToml>,
    aws: Option<AwsRecipeToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StepToml {
    copy: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    run: Option<Spanned<String>>,
    shell: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct InstanceToml {
    command: Spanned<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    health: Option<Spanned<HealthToml>>,
    ready_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HealthToml {
    http: Option<Spanned<String>>,
    tcp: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AwsRecipeToml {
    base: Option<Spanned<AwsBaseToml>>,
    base_ami: Option<Spanned<String>>,
    instance_type: Option<Spanned<String>>,
    volume_size_gib: Option<Spanned<u32>>,
    instance_profile: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AwsBaseToml {
    owner: Spanned<String>,
    name: Spanned<String>,
}

/// A validated recipe. Its serialised form is the normalised recipe that goes into the recipe key, so it holds
/// no description and no location on disk.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Recipe {
    #[serde(skip)]
    pub name: String,
    #[serde(skip)]
    pub file: RepoPath,
    #[serde(skip)]
    pub description: Option<String>,
    /// The key covers the parent's image digest instead of its name.
    #[serde(skip)]
    pub parent: Option<String>,
    pub provision: Vec<Provision>,
    pub instance: Option<Instance>,
    /// Left out of the serialised recipe: the AWS provider hashes it through its build settings (with the resolved
    /// base AMI), so a local key does not change when a recipe gains `[aws]` (docs/recipe-key.md).
    #[serde(skip)]
    pub aws: Option<AwsRecipe>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Provision {
    /// Copy a repository file or directory to an absolute path in the image.
    Copy { source: RepoPath, to: String },
    /// Run a repository script with the image root as `$KILN_ROOT`.
    Run { script: RepoPath, timeout_secs: u64 },
    /// Run a `sh -c` command line with the image root as `$KILN_ROOT`.
    Shell { command: String, timeout_secs: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Instance {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub health: Health,
    pub ready_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Http(String),
    Tcp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AwsBase {
    pub owner: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AwsRecipe {
    pub base: Option<AwsBase>,
    pub base_ami: Option<String>,
    pub instance_type: Option<String>,
    pub volume_size_gib: Option<u32>,
    pub instance_profile: Option<String>,
}

impl Instance {
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.ready_timeout_secs)
    }
}

/// Loads `images/<name>.toml` and validates it on its own (the parent is checked by [`load_chain`]).
pub fn load(repo: &Repo, name: &str) -> Result<Recipe, ConfigError> {
    check_name("recipe", name)?;
    let dir = repo.root().join(IMAGES_DIR);
    let path = dir.join(format!("{name}.toml"));
    if !path.is_file() {
        return Err(ConfigError::NotFound {
            kind: "recipe",
            name: name.to_string(),
            file: repo.display(&path),
            available: toml_stems(&dir),
        });
    }
    let source = Source::read(repo, &path)?;
    let raw: RecipeToml = source.parse()?;
    validate(repo, &source, name, raw)
}

/// Loads a recipe and its ancestors, root first. A missing parent or a cycle is reported at the `parent` key.
pub fn load_chain(repo: &Repo, name: &str) -> Result<Vec<Recipe>, ConfigError> {
    let mut chain = vec![load(repo, name)?];
    loop {
        let child = chain.last().expect("chain starts with one recipe");
        let Some(parent_name) = child.parent.clone() else {
            break;
        };
        if let Some(pos) = chain.iter().position(|r| r.name == parent_name) {
            let mut cycle: Vec<&str> = chain[pos..].iter().map(|r| r.name.as_str()).collect();
            cycle.push(&parent_name);
            return Err(parent_error(repo, child, format!("parents form a cycle: {}", cycle.join(" -> "))));
        }
        let parent = match load(repo, &parent_name) {
            Ok(parent) => parent,
            Err(ConfigError::NotFound { file, available, .. }) => {
                let hint =
                    if available.is_empty() { String::new() } else { format!("; recipes: {}", available.join(", ")) };
                return Err(parent_error(
                    repo,
                    child,
                    format!("parent recipe `{parent_name}` does not exist ({} is missing){hint}", file.display()),
                ));
            }
            Err(other) => return Err(other),
        };
        chain.push(parent);
    }
    chain.reverse();
    Ok(chain)
}

/// A chain the AWS provider bakes starts from an AMI, so its root recipe must name one. Checked when an AWS
/// pipeline loads, since a recipe alone does not know which provider bakes it.
pub(crate) fn require_aws_base(repo: &Repo, root: &Recipe, pipeline: &str) -> Result<(), ConfigError> {
    if root.aws.as_ref().is_some_and(|aws| aws.base.is_some() || aws.base_ami.is_some()) {
        return Ok(());
    }
    let source = Source::read(repo, &root.file.absolute)?;
    let span = find_table_span(&source.text, "aws").unwrap_or(0..0);
    Err(source.error(
        span,
        "aws.base",
        format!(
            "pipeline `{pipeline}` bakes `{}` on AWS, and a recipe without `parent` starts from an AMI: set \
             `base = {{ owner = \"…\", name = \"…\" }}` or `base-ami = \"ami-…\"` in its [aws] table",
            root.name
        ),
    ))
}

/// Where the `[name]` table header is in a TOML text.
fn find_table_span(text: &str, name: &str) -> Option<std::ops::Range<usize>> {
    let header = format!("[{name}]");
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with(&header) {
            let start = offset + (line.len() - trimmed.len());
            return Some(start..start + header.len());
        }
        offset += line.len();
    }
    None
}

fn parent_error(repo: &Repo, recipe: &Recipe, message: String) -> ConfigError {
    match Source::read(repo, &recipe.file.absolute) {
        Ok(source) => {
            let span = find_key_span(&source.text, "parent").unwrap_or(0..0);
            source.error(span, "parent", message)
        }
        Err(err) => err,
    }
}

/// Where `key = …` starts at the top level of a TOML text, for errors found after parsing.
fn find_key_span(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            return None;
        }
        if let Some(rest) = trimmed.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                let start = offset + (line.len() - trimmed.len());
                return Some(start..start + key.len());
            }
        }
        offset += line.len();
    }
    None
}

fn validate(repo: &Repo, source: &Source, name: &str, raw: RecipeToml) -> Result<Recipe, ConfigError> {
    let file = repo.resolve(&source.absolute, &format!("{name}.toml")).map_err(|m| source.error(0..0, "(file)", m))?;
    let parent = match raw.parent {
        Some(parent) => {
            if let Some(problem) = name_problem(parent.get_ref()) {
                return Err(source.error(
                    parent.span(),
                    "parent",
                    format!("`{}` is not a valid recipe name: {problem}", parent.get_ref().escape_debug()),
                ));
            }
            if parent.get_ref() == name {
                return Err(source.error(
                    parent.span(),
                    "parent",
                    format!("recipe `{name}` names itself as its parent"),
                ));
            }
            Some(parent.into_inner())
        }
        None => None,
    };

    let mut provision = Vec::with_capacity(raw.provision.len());
    for (index, step) in raw.provision.into_iter().enumerate() {
        let span = step.span();
        let field = format!("provision[{index}]");
        let step = step.into_inner();
        let timeout_secs = match &step.timeout {
            Some(t) => parse_duration(t.get_ref())
                .map_err(|m| source.error(t.span(), format!("{field}.timeout"), m))?
                .as_secs()
                .max(1),
            None => DEFAULT_STEP_TIMEOUT.as_secs(),
        };
        let kinds = [step.copy.is_some(), step.run.is_some(), step.shell.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(source.error(span, field, "a provision step needs exactly one of `copy`, `run` or `shell`"));
        }
        if let (Some(to), None) = (&step.to, &step.copy) {
            return Err(source.error(to.span(), format!("{field}.to"), "`to` goes with `copy` only"));
        }
        let parsed = if let Some(copy) = step.copy {
            let resolved = repo
                .resolve(&source.absolute, copy.get_ref())
                .map_err(|m| source.error(copy.span(), format!("{field}.copy"), m))?;
            let to = step.to.ok_or_else(|| {
                source.error(span.clone(), format!("{field}.to"), "`copy` needs `to`, an absolute path in the image")
            })?;
            let target = image_path(to.get_ref()).map_err(|m| source.error(to.span(), format!("{field}.to"), m))?;
            if step.timeout.is_some() {
                return Err(source.error(
                    span,
                    format!("{field}.timeout"),
                    "`timeout` goes with `run` and `shell` only",
                ));
            }
            Provision::Copy { source: resolved, to: target }
        } else if let Some(run) = step.run {
            let script = repo
                .resolve(&source.absolute, run.get_ref())
                .map_err(|m| source.error(run.span(), format!("{field}.run"), m))?;
            if !script.absolute.is_file() {
                return Err(source.error(
                    run.span(),
                    format!("{field}.run"),
                    format!("`{}` is not a file", run.get_ref()),
                ));
            }
            Provision::Run { script, timeout_secs }
        } else {
            let shell = step.shell.expect("exactly one kind is set");
            if shell.get_ref().trim().is_empty() {
                return Err(source.error(shell.span(), format!("{field}.shell"), "the command is empty"));
            }
            Provision::Shell { command: shell.into_inner(), timeout_secs }
        };
        provision.push(parsed);
    }

    let instance = raw.instance.map(|i| validate_instance(source, i)).transpose()?;
    let aws = raw.aws.map(|aws| validate_aws(source, parent.as_deref(), aws)).transpose()?;

    Ok(Recipe { name: name.to_string(), file, description: raw.description, parent, provision, instance, aws })
}

/// EBS allows volumes of 1 GiB to 16 TiB.
const VOLUME_SIZE_GIB: std::ops::RangeInclusive<u32> = 1..=16384;

fn validate_aws(source: &Source, parent: Option<&str>, raw: AwsRecipeToml) -> Result<AwsRecipe, ConfigError> {
    // A child bakes on its parent's image, so a base of its own would be ignored or, worse, win silently.
    if let Some(parent) = parent {
        let own_base = raw.base.as_ref().map(|b| ("aws.base", b.span()));
        if let Some((field, span)) = own_base.or(raw.base_ami.as_ref().map(|a| ("aws.base-ami", a.span()))) {
            return Err(source.error(
                span,
                field,
                format!(
                    "a recipe with a parent builds on its parent's image; set the base in the root recipe, not here \
                     (parent = \"{parent}\")"
                ),
            ));
        }
    }
    if let (Some(_), Some(ami)) = (&raw.base, &raw.base_ami) {
        return Err(source.error(ami.span(), "aws.base-ami", "set either `base` or `base-ami`, not both"));
    }
    if let Some(ami) = &raw.base_ami {
        aws_shape::resource_id(ami.get_ref(), "ami", "an AMI id")
            .map_err(|m| source.error(ami.span(), "aws.base-ami", m))?;
    }
    let base = match raw.base {
        Some(base) => {
            let base = base.into_inner();
            aws_shape::image_owner(base.owner.get_ref())
                .map_err(|m| source.error(base.owner.span(), "aws.base.owner", m))?;
            if base.name.get_ref().trim().is_empty() {
                return Err(source.error(
                    base.name.span(),
                    "aws.base.name",
                    "the name filter is empty; write the AMI name, with `*` for the changing part, like \
                     \"debian-12-amd64-*\"",
                ));
            }
            Some(AwsBase { owner: base.owner.into_inner(), name: base.name.into_inner() })
        }
        None => None,
    };
    if let Some(instance_type) = &raw.instance_type {
        aws_shape::instance_type(instance_type.get_ref())
            .map_err(|m| source.error(instance_type.span(), "aws.instance-type", m))?;
    }
    if let Some(size) = &raw.volume_size_gib {
        if !VOLUME_SIZE_GIB.contains(size.get_ref()) {
            return Err(source.error(
                size.span(),
                "aws.volume-size-gib",
                format!("{} GiB is outside what EBS allows, 1 to 16384", size.get_ref()),
            ));
        }
    }
    if let Some(profile) = &raw.instance_profile {
        if profile.get_ref().trim().is_empty() {
            return Err(source.error(
                profile.span(),
                "aws.instance-profile",
                "the instance profile is empty; name one that lets SSM reach the builder",
            ));
        }
    }
    Ok(AwsRecipe {
        base,
        base_ami: raw.base_ami.map(Spanned::into_inner),
        instance_type: raw.instance_type.map(Spanned::into_inner),
        volume_size_gib: raw.volume_size_gib.map(Spanned::into_inner),
        instance_profile: raw.instance_profile.map(Spanned::into_inner),
    })
}

fn validate_instance(source: &Source, raw: InstanceToml) -> Result<Instance, ConfigError> {
    let command_span = raw.command.span();
    let command = raw.command.into_inner();
    if command.is_empty() || command[0].trim().is_empty() {
        return Err(source.error(
            command_span,
            "instance.command",
            "the command is empty; give the program and its arguments",
        ));
    }
    let mut env = BTreeMap::new();
    for (key, value) in raw.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(source.error(
                value.span(),
                format!("instance.env.{key}"),
                "not a valid environment variable name",
            ));
        }
        if key == "PORT" {
            return Err(source.error(value.span(), "instance.env.PORT", "PORT is assigned by kiln to each instance"));
        }
        env.insert(key, value.into_inner());
    }
    let health = match raw.health {
        None => Health::Tcp,
        Some(spanned) => {
            let span = spanned.span();
            let health = spanned.into_inner();
            match (health.http, health.tcp) {
                (Some(path), None) => {
                    if !path.get_ref().starts_with('/') {
                        return Err(source.error(
                            path.span(),
                            "instance.health.http",
                            format!("`{}` must start with `/`", path.get_ref()),
                        ));
                    }
                    Health::Http(path.into_inner())
                }
                (None, Some(true)) => Health::Tcp,
                (None, Some(false)) => {
                    return Err(source.error(
                        span,
                        "instance.health.tcp",
                        "`tcp = false` checks nothing; use `tcp = true` or `http = \"/path\"`",
                    ))
                }
                _ => {
                    return Err(source.error(
                        span,
                        "instance.health",
                        "set exactly one of `http = \"/path\"` or `tcp = true`",
                    ))
                }
            }
        }
    };
    let ready_timeout = match raw.ready_timeout {
        Some(t) => parse_duration(t.get_ref()).map_err(|m| source.error(t.span(), "instance.ready-timeout", m))?,
        None => DEFAULT_READY_TIMEOUT,
    };
    Ok(Instance { command, env, health, ready_timeout_secs: ready_timeout.as_secs().max(1) })
}

/// An absolute, normalised path inside the image.
fn image_path(to: &str) -> Result<String, String> {
    let path = Path::new(to);
    if !path.is_absolute() {
        return Err(format!("`{to}` must be an absolute path in the image, like /opt/app"));
    }
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            std::path::Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            std::path::Component::RootDir | std::path::Component::CurDir => {}
            _ => return Err(format!("`{to}` must not contain `..`")),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_are_normalised() {
        assert_eq!(image_path("/opt//hello/./bin").unwrap(), "/opt/hello/bin");
        assert_eq!(image_path("/").unwrap(), "/");
        assert!(image_path("opt/hello").is_err());
        assert!(image_path("/opt/../etc").is_err());
    }

    #[test]
    fn finds_table_headers() {
        let text = "a = 1\n[instance]\nx = 1\n  [aws]\n";
        assert_eq!(find_table_span(text, "aws"), Some(25..30));
        assert_eq!(find_table_span(text, "instance"), Some(6..16));
        assert_eq!(find_table_span("[[aws]]\n", "aws"), None);
    }

    #[test]
    fn finds_top_level_keys_only() {
        let text = "description = \"x\"\nparent = \"base\"\n[instance]\nparent = 1\n";
        assert_eq!(find_key_span(text, "parent"), Some(18..24));
        assert_eq!(find_key_span("[x]\nparent = 1\n", "parent"), None);
    }
}
