//! Bad configuration is refused with exit 2 and a message naming file, line, column and field, and nothing is
//! written to the ledger. One row per mistake a user can make.

mod common;

use common::Repo;

const P: &str = "pipelines/hello.toml";
const R: &str = "images/hello.toml";
const B: &str = "images/base.toml";
const A: &str = "pipelines/hello-aws.toml";

/// (file to edit, text to replace, replacement, expected fragment of the error)
const EDITS: &[(&str, &str, &str, &str)] = &[
    // syntax and shape
    (P, "image = \"hello\"", "image = \"hello", "pipelines/hello.toml:2:"),
    (
        P,
        "capacity = 2",
        "capcity = 2",
        "pipelines/hello.toml:8:1: stage[0].capcity: unknown field `capcity`, expected one of",
    ),
    (
        P,
        "capacity = 2",
        "capacity = \"two\"",
        "pipelines/hello.toml:8:12: stage[0].capacity: invalid type: string \"two\", expected u32",
    ),
    (P, "image = \"hello\"\n", "", "missing field `image`"),
    (
        P,
        "approvals = 1",
        "approvals = 1\nbogus = 2",
        "pipelines/hello.toml:31:1: stage[2].gate[0].bogus: unknown field `bogus`",
    ),
    (R, "description =", "summary =", "images/hello.toml:3:1: summary: unknown field `summary`"),
    (
        R,
        "health = { http = \"/healthz\" }",
        "health = { htp = \"/healthz\" }",
        "images/hello.toml:16:12: instance.health.htp: unknown field `htp`",
    ),
    // pipeline semantics
    (P, "name = \"test\"", "name = \"dev\"", "pipelines/hello.toml:16:8: stage[1].name: stage `dev` is defined twice"),
    (P, "name = \"test\"", "name = \"Test\"", "stage[1].name: `Test` is not a stage name"),
    (P, "image = \"hello\"", "image = \"nope\"", "pipelines/hello.toml:2:9: image: recipe `nope` does not exist"),
    (
        P,
        "image = \"hello\"",
        "image = \"a b\"",
        "pipelines/hello.toml:2:9: image: `a b` is not a valid recipe name: it contains a space; use letters, digits",
    ),
    (P, "image = \"hello\"", "image = \"../hello\"", "image: `../hello` is not a valid recipe name: it contains `/`"),
    (P, "image = \"hello\"", "image = \"\"", "image: `` is not a valid recipe name: it is empty"),
    (P, "provider = \"local\"", "provider = \"gcp\"", "pipelines/hello.toml:3:12: provider: unknown provider `gcp`"),
    (
        P,
        "ledger = \".kiln/ledger\"",
        "ledger = \"ftp://host/x\"",
        "pipelines/hello.toml:4:10: ledger: ledger scheme `ftp://` is not supported",
    ),
    (P, "capacity = 3", "capacity = 0", "pipelines/hello.toml:24:12: stage[2].capacity: capacity must be at least 1"),
    (
        P,
        "deploy = { port = 18082 }",
        "deploy = { port = 18081 }",
        "pipelines/hello.toml:18:19: stage[1].deploy.port: port 18081 is used by another stage",
    ),
    (P, "deploy = { port = 18083 }", "deploy = { port = 80 }", "stage[2].deploy.port: port 80 is privileged"),
    (P, "deploy = { port = 18083 }\n", "", "stage[2].deploy: a local stage needs `deploy = { port = N }`"),
    (
        P,
        "soak = \"10m\"",
        "soak = \"10 parsecs\"",
        "pipelines/hello.toml:20:8: stage[1].gate[0].soak: `10 parsecs` is not a duration",
    ),
    (
        P,
        "soak = \"10m\"",
        "soak = \"10m\"\napprovals = 2",
        "stage[1].gate[0]: a gate needs exactly one of `soak`, `command` or `approvals`",
    ),
    (
        P,
        "soak = \"10m\"",
        "soak = \"10m\"\ntimeout = \"1m\"",
        "stage[1].gate[0].timeout: `timeout` goes with `command`",
    ),
    (
        P,
        "approvals = 1",
        "approvals = 0",
        "pipelines/hello.toml:30:13: stage[2].gate[0].approvals: approvals must be at least 1",
    ),
    (
        P,
        "approvals = 1",
        "approvals = 2\napprovers = [\"ana\"]",
        "stage[2].gate[0].approvals: needs 2 approvals but only 1 approvers are allowed",
    ),
    (
        P,
        "command = [\"scripts/smoke.sh\"]",
        "command = [\"scripts/nope.sh\"]",
        "pipelines/hello.toml:12:11: stage[0].gate[0].command: `scripts/nope.sh` does not exist",
    ),
    (P, "command = [\"scripts/smoke.sh\"]", "command = []", "stage[0].gate[0].command: the command is empty"),
    (
        P,
        "command = [\"scripts/smoke.sh\"]",
        "command = [\"../../../bin/sh\"]",
        "stage[0].gate[0].command: `../../../bin/sh` escapes the repository",
    ),
    (
        P,
        "timeout = \"1m\"",
        "timeout = \"soon\"",
        "pipelines/hello.toml:13:11: stage[0].gate[0].timeout: `soon` is not a duration",
    ),
    // recipe semantics
    (
        R,
        "parent = \"base\"",
        "parent = \".base\"",
        "images/hello.toml:2:10: parent: `.base` is not a valid recipe name: it starts with `.`",
    ),
    (R, "parent = \"base\"", "parent = \"ba se\"", "parent: `ba se` is not a valid recipe name: it contains a space"),
    (R, "parent = \"base\"", "parent = \"nope\"", "images/hello.toml:2:1: parent: parent recipe `nope` does not exist"),
    (
        R,
        "parent = \"base\"",
        "parent = \"hello\"",
        "images/hello.toml:2:10: parent: recipe `hello` names itself as its parent",
    ),
    (
        R,
        "copy = \"files/hello\"",
        "copy = \"../../etc\"",
        "images/hello.toml:6:8: provision[0].copy: `../../etc` escapes the repository through `..`",
    ),
    (R, "copy = \"files/hello\"", "copy = \"/etc\"", "images/hello.toml:6:8: provision[0].copy: `/etc` is absolute"),
    (R, "copy = \"files/hello\"", "copy = \"files/missing\"", "provision[0].copy: `files/missing` does not exist"),
    (
        R,
        "run = \"scripts/build-hello.sh\"",
        "run = \"scripts/missing.sh\"",
        "images/hello.toml:10:7: provision[1].run: `scripts/missing.sh` does not exist",
    ),
    (R, "run = \"scripts/build-hello.sh\"", "run = \"scripts\"", "provision[1].run: `scripts` is not a file"),
    (
        R,
        "to = \"/opt/hello/src\"",
        "to = \"/opt/hello/src\"\nrun = \"scripts/build-hello.sh\"",
        "images/hello.toml:5:1: provision[0]: a provision step needs exactly one of `copy`, `run` or `shell`",
    ),
    (R, "to = \"/opt/hello/src\"\n", "", "provision[0].to: `copy` needs `to`"),
    (
        R,
        "to = \"/opt/hello/src\"",
        "to = \"opt/hello\"",
        "images/hello.toml:7:6: provision[0].to: `opt/hello` must be an absolute path in the image",
    ),
    (R, "to = \"/opt/hello/src\"", "to = \"/opt/../etc\"", "provision[0].to: `/opt/../etc` must not contain `..`"),
    (R, "timeout = \"5m\"", "timeout = \"5m\"\nto = \"/x\"", "provision[1].to: `to` goes with `copy` only"),
    (
        R,
        "timeout = \"5m\"",
        "timeout = \"5 fortnights\"",
        "images/hello.toml:11:11: provision[1].timeout: `5 fortnights` is not a duration",
    ),
    (
        R,
        "command = [\"/opt/hello/bin/hello\"]",
        "command = []",
        "images/hello.toml:14:11: instance.command: the command is empty",
    ),
    (
        R,
        "health = { http = \"/healthz\" }",
        "health = { http = \"/healthz\", tcp = true }",
        "images/hello.toml:16:10: instance.health: set exactly one of",
    ),
    (
        R,
        "health = { http = \"/healthz\" }",
        "health = { http = \"healthz\" }",
        "instance.health.http: `healthz` must start with `/`",
    ),
    (
        R,
        "env = { GREETING = \"hello from kiln\" }",
        "env = { PORT = \"80\" }",
        "instance.env.PORT: PORT is assigned by kiln",
    ),
    (
        R,
        "ready-timeout = \"30s\"",
        "ready-timeout = \"thirty\"",
        "images/hello.toml:17:17: instance.ready-timeout: `thirty` is not a duration",
    ),
    // approvals gate keys
    (
        P,
        "soak = \"10m\"",
        "soak = \"10m\"\ndistinct-from-promoter = true",
        "pipelines/hello.toml:21:26: stage[1].gate[0].distinct-from-promoter: `distinct-from-promoter` goes with `approvals`",
    ),
    (
        P,
        "approvals = 1",
        "approvals = 1\ndistinct-from-promoter = \"yes\"",
        "stage[2].gate[0].distinct-from-promoter: invalid type: string \"yes\", expected a boolean",
    ),
    (
        P,
        "approvals = 1",
        "approvals = 1\napprovers = [\"ana\", \"eve\\nmallory\"]",
        "pipelines/hello.toml:31:21: stage[2].gate[0].approvers[1]: `eve\\nmallory` is not a valid actor name: it contains the control character",
    ),
    // every duration is bounded: 1s to 365 days, so a later sum with the clock cannot overflow
    (
        P,
        "capacity = 3",
        "capacity = 3\nlease = \"10000y\"",
        "pipelines/hello.toml:25:9: stage[2].lease: `10000y` is longer than 365 days",
    ),
    (P, "capacity = 3", "capacity = 3\nlease = \"0s\"", "stage[2].lease: `0s` is shorter than 1s"),
    (
        P,
        "capacity = 3",
        "capacity = 3\nready-timeout = \"400d\"",
        "pipelines/hello.toml:25:17: stage[2].ready-timeout: `400d` is longer than 365 days",
    ),
    (
        P,
        "soak = \"10m\"",
        "soak = \"9999999y\"",
        "pipelines/hello.toml:20:8: stage[1].gate[0].soak: `9999999y` is longer than 365 days",
    ),
    (P, "soak = \"10m\"", "soak = \"100ms\"", "stage[1].gate[0].soak: `100ms` is shorter than 1s"),
    // the verification window
    (
        P,
        "timeout = \"1m\"",
        "timeout = \"1m\"\n[[stage.verify]]\ncommand = [\"scripts/smoke.sh\"]",
        "stage[0].verify-for: [[stage.verify]] checks need `verify-for`",
    ),
    (
        P,
        "timeout = \"1m\"",
        "timeout = \"1m\"\n[[stage.verify]]\nalarm = \"hello-5xx\"",
        "stage[0].verify[0].alarm: `alarm` checks are CloudWatch alarms and need provider = \"aws\"",
    ),
    (
        P,
        "timeout = \"1m\"",
        "timeout = \"1m\"\n[[stage.verify]]\ncommand = [\"scripts/smoke.sh\"]\nalarm = \"x\"",
        "stage[0].verify[0]: a verify check needs exactly one of `command` or `alarm`",
    ),
    (
        P,
        "timeout = \"1m\"",
        "timeout = \"1m\"\n[[stage.verify]]\ncommand = []",
        "stage[0].verify[0].command: the command is empty",
    ),
    (
        P,
        "timeout = \"1m\"",
        "timeout = \"1m\"\n[[stage.verify]]\ncommand = [\"scripts/nope.sh\"]",
        "stage[0].verify[0].command:",
    ),
    (
        P,
        "timeout = \"1m\"",
        "timeout = \"1m\"\n[[stage.verify]]\ncomand = [\"scripts/smoke.sh\"]",
        "unknown field `comand`",
    ),
    (P, "capacity = 2", "capacity = 2\nverify-for = \"0s\"", "stage[0].verify-for: `0s` is shorter than 1s"),
    (
        P,
        "timeout = \"1m\"",
        "timeout = \"1m\"\n[[stage.verify]]\ncommand = [\"scripts/smoke.sh\"]\ninterval = \"400d\"",
        "stage[0].verify[0].interval: `400d` is longer than 365 days",
    ),
    (
        P,
        "timeout = \"1m\"",
        "timeout = \"2y\"",
        "pipelines/hello.toml:13:11: stage[0].gate[0].timeout: `2y` is longer than 365 days",
    ),
    (
        R,
        "timeout = \"5m\"",
        "timeout = \"10000y\"",
        "images/hello.toml:11:11: provision[1].timeout: `10000y` is longer than 365 days",
    ),
    (
        R,
        "ready-timeout = \"30s\"",
        "ready-timeout = \"1000000000000000000000s\"",
        "images/hello.toml:17:17: instance.ready-timeout: `1000000000000000000000s` is not a duration",
    ),
    (
        R,
        "ready-timeout = \"30s\"",
        "ready-timeout = \"0s\"",
        "images/hello.toml:17:17: instance.ready-timeout: `0s` is shorter than 1s",
    ),
];

/// Mistakes in the `[aws]` sections of recipes (under the local pipeline too: a recipe does not know its pipeline)
/// and in a local pipeline that names AWS settings it would ignore. Same shape as [`EDITS`].
const AWS_RECIPE_AND_LOCAL_EDITS: &[(&str, &str, &str, &str)] = &[
    // a child builds on its parent's image
    (
        R,
        "instance-profile = \"kiln-builder\"",
        "instance-profile = \"kiln-builder\"\nbase-ami = \"ami-0123abcd\"",
        "images/hello.toml:23:12: aws.base-ami: a recipe with a parent builds on its parent's image; set the base in \
         the root recipe, not here (parent = \"base\")",
    ),
    (
        R,
        "instance-profile = \"kiln-builder\"",
        "instance-profile = \"kiln-builder\"\nbase = { owner = \"amazon\", name = \"al2023-*\" }",
        "images/hello.toml:23:8: aws.base: a recipe with a parent builds on its parent's image",
    ),
    (
        R,
        "instance-profile =",
        "instance-role =",
        "images/hello.toml:22:1: aws.instance-role: unknown field `instance-role`",
    ),
    // the root's base
    (
        B,
        "volume-size-gib = 8",
        "volume-size-gib = 8\nbase-ami = \"ami-0123abcd\"",
        "images/base.toml:15:12: aws.base-ami: set either `base` or `base-ami`, not both",
    ),
    (
        B,
        "base = { owner = \"amazon\", name = \"al2023-ami-2023.*-kernel-6.12-x86_64\" }",
        "base-ami = \"ami-123\"",
        "images/base.toml:12:12: aws.base-ami: `ami-123` is not an AMI id (ami- and 8 or 17 hex digits)",
    ),
    (
        B,
        "base = { owner = \"amazon\", name = \"al2023-ami-2023.*-kernel-6.12-x86_64\" }",
        "base-ami = \"img-0123abcd\"",
        "aws.base-ami: `img-0123abcd` is not an AMI id",
    ),
    (
        B,
        "owner = \"amazon\"",
        "owner = \"debian\"",
        "images/base.toml:12:18: aws.base.owner: `debian` is not an image owner: write a 12-digit account id, \
         \"amazon\", \"self\" or \"aws-marketplace\"",
    ),
    (B, "owner = \"amazon\"", "owner = \"13669307136\"", "aws.base.owner: `13669307136` is not an image owner"),
    (
        B,
        "name = \"al2023-ami-2023.*-kernel-6.12-x86_64\"",
        "name = \" \"",
        "images/base.toml:12:35: aws.base.name: the name filter is empty",
    ),
    (B, "name = \"al2023-ami-2023.*-kernel-6.12-x86_64\"", "nme = \"x\"", "aws.base.nme: unknown field `nme`"),
    (B, ", name = \"al2023-ami-2023.*-kernel-6.12-x86_64\"", "", "images/base.toml:12:8: aws.base: missing field `name`"),
    // the builder
    (
        B,
        "volume-size-gib = 8",
        "volume-size-gib = 0",
        "images/base.toml:14:19: aws.volume-size-gib: 0 GiB is outside what EBS allows, 1 to 16384",
    ),
    (B, "volume-size-gib = 8", "volume-size-gib = 16385", "aws.volume-size-gib: 16385 GiB is outside what EBS allows"),
    (B, "volume-size-gib = 8", "volume-size-gib = -8", "images/base.toml:14:19: aws.volume-size-gib: invalid value"),
    (
        B,
        "instance-type = \"t3.small\"",
        "instance-type = \"t3small\"",
        "images/base.toml:13:17: aws.instance-type: `t3small` is not an instance type; write family.size, like \
         \"t3.small\"",
    ),
    (
        B,
        "instance-type = \"t3.small\"",
        "instance-type = \"T3.Small\"",
        "aws.instance-type: `T3.Small` must be lowercase",
    ),
    (
        B,
        "instance-profile = \"kiln-builder\"",
        "instance-profile = \"\"",
        "aws.instance-profile: the instance profile is empty",
    ),
    // a local pipeline does not take AWS settings it would ignore
    (
        P,
        "ledger = \".kiln/ledger\"",
        "ledger = \".kiln/ledger\"\n[aws]\nregion = \"us-east-1\"\nartifact-bucket = \"acme-kiln-artifacts\"",
        "pipelines/hello.toml:7:19: aws.artifact-bucket: `artifact-bucket` is for provider = \"aws\"; a local pipeline \
         would ignore it (its [aws] holds only `region` and `profile`, for an s3:// ledger)",
    ),
    (
        P,
        "ledger = \".kiln/ledger\"",
        "ledger = \".kiln/ledger\"\n[aws]\nbuilder-subnet = \"subnet-0123abcd\"",
        "pipelines/hello.toml:6:18: aws.builder-subnet: `builder-subnet` is for provider = \"aws\"",
    ),
    (
        P,
        "ledger = \".kiln/ledger\"",
        "ledger = \".kiln/ledger\"\n[aws]\nregion = \"eu-west\"",
        "pipelines/hello.toml:6:10: aws.region: `eu-west` is not an AWS region",
    ),
    (
        P,
        "deploy = { port = 18083 }",
        "deploy = { port = 18083, accounts = [\"111122223333\"] }",
        "pipelines/hello.toml:25:37: stage[2].deploy.accounts: `accounts` is for provider = \"aws\"; this pipeline's \
         provider is \"local\"",
    ),
    (
        P,
        "deploy = { port = 18083 }",
        "deploy = { port = 18083, instance-type = \"t3.small\" }",
        "stage[2].deploy.instance-type: `instance-type` is for provider = \"aws\"",
    ),
];

/// Mistakes in the AWS example pipeline (run with `--pipeline hello-aws`); same shape as [`EDITS`].
const AWS_PIPELINE_EDITS: &[(&str, &str, &str, &str)] = &[
    // the root recipe of an AWS pipeline starts from an AMI
    (
        B,
        "base = { owner = \"amazon\", name = \"al2023-ami-2023.*-kernel-6.12-x86_64\" }\n",
        "",
        "images/base.toml:9:1: aws.base: pipeline `hello-aws` bakes `base` on AWS, and a recipe without `parent` \
         starts from an AMI: set `base = { owner = \"…\", name = \"…\" }` or `base-ami = \"ami-…\"` in its [aws] table",
    ),
    // a stage's instance profile, when named, has a name
    (
        A,
        "instance-profile = \"hello\"                    #",
        "instance-profile = \"  \"                    #",
        "pipelines/hello-aws.toml:22:20: stage[0].deploy.instance-profile: the instance profile name is empty",
    ),
    // [aws]
    (
        A,
        "region = \"us-east-1\"",
        "region = \"us-east\"",
        "pipelines/hello-aws.toml:9:10: aws.region: `us-east` is not an AWS region; write one like \"us-east-1\" or \
         \"eu-central-2\"",
    ),
    (
        A,
        "region = \"us-east-1\"",
        "region = \"us-east-1a\"",
        "aws.region: `us-east-1a` is an availability zone; the region is `us-east-1`",
    ),
    (A, "region = \"us-east-1\"", "region = \"US-EAST-1\"", "aws.region: `US-EAST-1` is not an AWS region"),
    (A, "region = \"us-east-1\"", "", "pipelines/hello-aws.toml:8:1: aws.region: the aws provider needs `region`"),
    (
        A,
        "artifact-bucket = \"acme-kiln-artifacts\"",
        "",
        "pipelines/hello-aws.toml:8:1: aws.artifact-bucket: the aws provider needs `artifact-bucket`, the S3 bucket \
         that stages provisioning files for the builder",
    ),
    (
        A,
        "artifact-bucket = \"acme-kiln-artifacts\"",
        "artifact-bucket = \"Acme_Artifacts\"",
        "pipelines/hello-aws.toml:10:19: aws.artifact-bucket: `Acme_Artifacts` is not a bucket name: 3 to 63 lowercase \
         letters, digits, `.` and `-`",
    ),
    (A, "artifact-bucket = \"acme-kiln-artifacts\"", "artifact-bucket = \"ab\"", "aws.artifact-bucket: `ab` is not a bucket name"),
    (
        A,
        "artifact-bucket = \"acme-kiln-artifacts\"",
        "artifact-bucket = \"s3://acme-kiln-artifacts/\"",
        "aws.artifact-bucket: write the bucket name alone, without s3:// (\"acme-kiln-artifacts\")",
    ),
    (
        A,
        "artifact-bucket =",
        "artifacts-bucket =",
        "pipelines/hello-aws.toml:10:1: aws.artifacts-bucket: unknown field `artifacts-bucket`",
    ),
    (
        A,
        "# builder-subnet = \"subnet-0123456789abcdef0\"",
        "builder-subnet = \"subnet-1\"",
        "pipelines/hello-aws.toml:12:18: aws.builder-subnet: `subnet-1` is not a subnet id (subnet- and 8 or 17 hex \
         digits)",
    ),
    (A, "# profile = \"kiln\"", "profile = \"\"", "pipelines/hello-aws.toml:11:11: aws.profile: the profile is empty"),
    // stage deploy tables
    (
        A,
        "regions = [\"us-east-1\", \"eu-west-1\"]",
        "regions = [\"us-east-1\", \"eu-west\"]",
        "pipelines/hello-aws.toml:48:25: stage[2].deploy.regions[1]: `eu-west` is not an AWS region",
    ),
    (
        A,
        "regions = [\"us-east-1\", \"eu-west-1\"]",
        "regions = [\"eu-west-1\", \"eu-west-1\"]",
        "pipelines/hello-aws.toml:48:25: stage[2].deploy.regions[1]: `eu-west-1` is listed twice",
    ),
    (
        A,
        "accounts = [\"111122223333\"]",
        "accounts = [\"all\"]",
        "pipelines/hello-aws.toml:49:13: stage[2].deploy.accounts[0]: kiln never makes an image public: list account ids",
    ),
    (
        A,
        "accounts = [\"111122223333\"]",
        "accounts = [\"111122223333\", \"*\"]",
        "stage[2].deploy.accounts[1]: kiln never makes an image public: list account ids",
    ),
    (
        A,
        "accounts = [\"111122223333\"]",
        "accounts = [\"1111-2222-3333\"]",
        "stage[2].deploy.accounts[0]: `1111-2222-3333` is not an AWS account id (12 digits)",
    ),
    (
        A,
        "accounts = [\"111122223333\"]",
        "accounts = [\"111122223333\", \"111122223333\"]",
        "pipelines/hello-aws.toml:49:29: stage[2].deploy.accounts[1]: `111122223333` is listed twice",
    ),
    (
        A,
        "instance-type = \"t3.small\"",
        "instance-type = \"t3\"",
        "pipelines/hello-aws.toml:21:17: stage[0].deploy.instance-type: `t3` is not an instance type",
    ),
    (
        A,
        "instance-type = \"t3.small\"",
        "instance-type = \"t3.small\"\nport = 8080",
        "pipelines/hello-aws.toml:22:8: stage[0].deploy.port: `port` is for the local provider",
    ),
    (
        A,
        "subnets = [\"subnet-0123456789abcdef0\", \"subnet-0fedcba9876543210\"]",
        "subnets = []",
        "stage[0].deploy.subnets: an AWS stage needs `subnets` for its Auto Scaling groups",
    ),
    (
        A,
        "accounts = [\"111122223333\"]",
        "acounts = [\"111122223333\"]",
        "pipelines/hello-aws.toml:49:1: stage[2].deploy.acounts: unknown field `acounts`",
    ),
];

fn assert_refused(repo: &Repo, args: &[&str], fragment: &str, what: &str) {
    let run = repo.run(args).expect(2);
    assert!(run.stderr.contains(fragment), "{what}: wanted {fragment:?} in:\n{}", run.stderr);
    assert!(!repo.file(".kiln/ledger/events").exists(), "{what}: a refused command wrote to the ledger");
}

#[test]
fn each_bad_edit_is_refused_with_its_location() {
    assert!(EDITS.len() >= 25);
    for (file, old, new, fragment) in EDITS {
        let repo = Repo::example();
        repo.edit(file, old, new);
        assert_refused(&repo, &["bake"], fragment, &format!("{file}: {old:?} -> {new:?}"));
    }
}

#[test]
fn each_bad_aws_edit_is_refused_with_its_location() {
    for (file, old, new, fragment) in AWS_RECIPE_AND_LOCAL_EDITS {
        let repo = Repo::example();
        repo.edit(file, old, new);
        assert_refused(&repo, &["bake"], fragment, &format!("{file}: {old:?} -> {new:?}"));
    }
    for (file, old, new, fragment) in AWS_PIPELINE_EDITS {
        let repo = Repo::example_with_every_pipeline();
        repo.edit(file, old, new);
        assert_refused(&repo, &["--pipeline", "hello-aws", "bake"], fragment, &format!("{file}: {old:?} -> {new:?}"));
    }
}

/// A root recipe with no [aws] table at all, under an AWS pipeline: the error points at the file's start.
#[test]
fn an_aws_pipeline_refuses_a_root_recipe_without_a_base() {
    let repo = Repo::example_with_every_pipeline();
    let text = std::fs::read_to_string(repo.file(B)).unwrap();
    let without_aws = &text[..text.find("[aws]").unwrap()];
    repo.write(B, without_aws);
    assert_refused(
        &repo,
        &["--pipeline", "hello-aws", "status"],
        "images/base.toml:1:1: aws.base: pipeline `hello-aws` bakes `base` on AWS, and a recipe without `parent`",
        "no base",
    );
    // The local pipeline beside it bakes base from an empty root, as before.
    repo.run(&["--pipeline", "hello", "log"]).ok();
}

/// A cycle needs a parent on the root recipe, whose `[aws] base` would be refused first, so base.toml is replaced
/// whole rather than edited.
#[test]
fn a_parent_cycle_is_refused_at_the_parent_key() {
    let repo = Repo::example();
    repo.write(B, "description = \"base\"\nparent = \"hello\"\n");
    assert_refused(
        &repo,
        &["bake"],
        "images/base.toml:2:1: parent: parents form a cycle: hello -> base -> hello",
        "cycle",
    );
}

#[test]
fn a_symlink_out_of_the_repository_is_refused() {
    let repo = Repo::example();
    std::os::unix::fs::symlink("/etc", repo.file("images/files/outside")).unwrap();
    repo.edit(R, "copy = \"files/hello\"", "copy = \"files/outside\"");
    assert_refused(
        &repo,
        &["bake"],
        "provision[0].copy: `files/outside` escapes the repository through a symlink",
        "symlink",
    );
}

#[test]
fn a_symlink_inside_a_path_is_followed_and_checked() {
    let repo = Repo::example();
    std::os::unix::fs::symlink("/", repo.file("images/root")).unwrap();
    repo.edit(R, "copy = \"files/hello\"", "copy = \"root/etc\"");
    assert_refused(&repo, &["bake"], "`root/etc` escapes the repository through a symlink", "nested symlink");
}

#[test]
fn pipeline_choice_errors() {
    let repo = Repo::example();
    assert_refused(
        &repo,
        &["bake", "--pipeline", "nope"],
        "no pipeline named `nope` (pipelines/nope.toml does not exist); available: hello",
        "unknown pipeline",
    );
    assert_refused(
        &repo,
        &["bake", "--pipeline", "../x"],
        "`../x` is not a valid pipeline name: it contains `/`",
        "bad name",
    );
    std::fs::copy(repo.file(P), repo.file("pipelines/other.toml")).unwrap();
    assert_refused(
        &repo,
        &["bake"],
        "pipelines/ holds 2 pipelines (hello, other): choose one with --pipeline",
        "ambiguous",
    );
    let empty = Repo::empty();
    std::fs::create_dir(empty.file("pipelines")).unwrap();
    assert_refused(&empty, &["bake"], "no pipeline found", "none");
}

/// The repository as shipped holds two pipelines (hello and hello-aws): a command that names none is refused with
/// both names and the way out, and the README's `--pipeline hello` (or `KILN_PIPELINE=hello`) works.
#[test]
fn the_repository_as_shipped_needs_the_pipeline_named() {
    let repo = Repo::example_with_every_pipeline();
    for args in [&["run"][..], &["status"], &["bake"]] {
        let refused = repo.run(args).expect(2);
        for wanted in [
            "pipelines/ holds 2 pipelines (hello, hello-aws): choose one with --pipeline",
            "hint: pass --pipeline NAME or set KILN_PIPELINE",
        ] {
            assert!(
                refused.stderr.contains(wanted),
                "`kiln {}`: wanted {wanted:?} in:\n{}",
                args.join(" "),
                refused.stderr
            );
        }
    }
    assert!(!repo.file(".kiln").exists(), "a refused command wrote nothing");
    let named = repo.run(&["status", "--pipeline", "hello", "--json"]).ok();
    assert_eq!(named.json()["pipeline"], "hello");
    let from_env = repo.kiln().args(["status", "--json"]).env("KILN_PIPELINE", "hello").output().unwrap();
    let from_env = common::Run::of(from_env, &["status", "--json"]).ok();
    assert_eq!(from_env.json()["pipeline"], "hello");
}

/// A local pipeline may keep its ledger in S3 (in the file, or through `--ledger`/`KILN_LEDGER`), and that ledger's
/// client reads `[aws] region` and `profile`: those stay accepted.
#[test]
fn a_local_pipeline_keeps_aws_region_and_profile_for_an_s3_ledger() {
    let repo = Repo::example();
    repo.edit(
        P,
        "ledger = \".kiln/ledger\"",
        "ledger = \".kiln/ledger\"\n[aws]\nregion = \"eu-west-1\"\nprofile = \"ci\"",
    );
    let run = repo.run(&["log", "--json"]).ok();
    assert_eq!(run.json()["events"], serde_json::json!([]));
}

#[test]
fn bad_global_input_is_refused() {
    let repo = Repo::example();
    assert_refused(
        &repo,
        &["log", "--ledger", "gopher://x"],
        "--ledger: ledger scheme `gopher://` is not supported",
        "ledger url",
    );
    let run = repo.kiln().args(["log"]).env("KILN_NOW", "yesterday").output().unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("KILN_NOW=`yesterday` is not an RFC 3339 time"));
    repo.run(&["no-such-command"]).expect(2);
    for (pinned, message) in [
        ("9999-12-31T23:59:59Z", "KILN_NOW=`9999-12-31T23:59:59Z` is outside the years 2000 to 2999"),
        ("1970-01-01T00:00:00Z", "KILN_NOW=`1970-01-01T00:00:00Z` is outside the years 2000 to 2999"),
    ] {
        let run = repo.kiln().args(["log"]).env("KILN_NOW", pinned).output().unwrap();
        assert_eq!(run.status.code(), Some(2), "KILN_NOW={pinned}");
        assert!(String::from_utf8_lossy(&run.stderr).contains(message), "KILN_NOW={pinned}");
    }
}

#[test]
fn the_examples_are_valid() {
    let repo = Repo::example();
    let run = repo.run(&["log", "--json"]).ok();
    assert_eq!(run.json()["events"], serde_json::json!([]));
}
