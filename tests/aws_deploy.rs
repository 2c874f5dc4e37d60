//! Deploys on AWS against moto with the real binary: `pipelines/hello-aws.toml` itself end to end (bake, promote
//! dev → test → prod through its gates, a second image, rollback, revoke, gc), CloudWatch alarms in the
//! verification window, `kiln down` refused, and drift found on the instances. What AWS then holds is checked with
//! boto3, never through kiln's own code.

mod common;
mod moto;

use std::path::Path;

use common::{copy_dir, Repo, Run};
use moto::app::{network, tag, write_pipeline, Network};
use moto::Moto;

const NOW: &str = "2026-11-28T12:00:00Z";
const LATER: &str = "2026-11-28T12:11:00Z";

fn at(moto: &Moto, repo: &Repo, now: &str, actor: &str, args: &[&str]) -> Run {
    let out = moto.kiln(repo).env("KILN_NOW", now).env("KILN_ACTOR", actor).args(args).output().unwrap();
    Run::of(out, args)
}

/// A copy of this repository's `images/` and `pipelines/hello-aws.toml` (the only pipeline), its REPLACE values
/// replaced with moto's, and moto set up for it: the buckets, the builder's instance profile, the network.
fn hello_aws(moto: &Moto) -> (Repo, Network) {
    moto.boto3(
        "s3.create_bucket(Bucket='acme-kiln-ledger')\n\
         s3.create_bucket(Bucket='acme-kiln-artifacts')\n\
         iam.create_instance_profile(InstanceProfileName='kiln-builder')\n\
         iam.create_instance_profile(InstanceProfileName='hello')",
    );
    let net = network(moto, &["dev", "test", "prod"]);
    let repo = Repo::empty();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    copy_dir(&src.join("images"), &repo.file("images"));
    copy_dir(&src.join("pipelines/scripts"), &repo.file("pipelines/scripts"));
    let mut pipeline = std::fs::read_to_string(src.join("pipelines/hello-aws.toml")).unwrap();
    let subnets =
        format!("subnets = [\"{}\"]\nsecurity-groups = [\"{}\"]", net.subnets.join("\", \""), net.security_group);
    pipeline = pipeline.replace("subnets = [\"subnet-0123456789abcdef0\", \"subnet-0fedcba9876543210\"]", &subnets);
    for (stage, arn) in ["dev", "test", "prod"].iter().zip(&net.target_groups) {
        let placeholder = format!(
            "\"arn:aws:elasticloadbalancing:us-east-1:111122223333:targetgroup/hello-{stage}/0123456789abcdef\""
        );
        assert!(pipeline.contains(&placeholder), "hello-aws.toml no longer has {placeholder}");
        pipeline = pipeline.replace(&placeholder, &format!("\"{arn}\""));
    }
    let left = pipeline.lines().filter(|l| !l.trim_start().starts_with('#')).find(|l| l.contains("0123456789abcdef"));
    assert_eq!(left, None, "a REPLACE value is left:\n{pipeline}");
    repo.write("pipelines/hello-aws.toml", &pipeline);
    (repo, net)
}

/// Every Auto Scaling group, by name, as boto3 describes it, plus `Template` (the launch template version it is
/// pinned to: name, version, data) and `InstanceImages` (the ImageId of each running instance, as EC2 says): one
/// boto3 run, as each costs a Python start.
fn asgs(moto: &Moto) -> serde_json::Value {
    let out = moto.boto3(
        "out = {}\n\
         for g in client('autoscaling').describe_auto_scaling_groups()['AutoScalingGroups']:\n\
         \x20   spec = g.get('LaunchTemplate')\n\
         \x20   if spec:\n\
         \x20       v = ec2.describe_launch_template_versions(LaunchTemplateId=spec['LaunchTemplateId'], Versions=[spec['Version']])['LaunchTemplateVersions'][0]\n\
         \x20       g['Template'] = {'name': v['LaunchTemplateName'], 'version': v['VersionNumber'], 'data': v['LaunchTemplateData']}\n\
         \x20   ids = [i['InstanceId'] for i in g['Instances']]\n\
         \x20   g['InstanceImages'] = []\n\
         \x20   if ids:\n\
         \x20       for r in ec2.describe_instances(InstanceIds=ids)['Reservations']:\n\
         \x20           g['InstanceImages'] += [i['ImageId'] for i in r['Instances'] if i['State']['Name'] == 'running']\n\
         \x20   out[g['AutoScalingGroupName']] = g\n\
         print(json.dumps(out, default=str))",
    );
    serde_json::from_str(&out).unwrap()
}

fn group_names_of(moto: &Moto, prefix: &str) -> Vec<String> {
    let all = asgs(moto);
    all.as_object().unwrap().keys().filter(|k| k.starts_with(prefix)).cloned().collect()
}

/// The groups attached to the target group, by name.
fn attached_in(all: &serde_json::Value, target_group: &str) -> Vec<String> {
    let mut names: Vec<String> = all
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, g)| g["TargetGroupARNs"].as_array().unwrap().iter().any(|a| a == target_group))
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    names
}

fn attached(moto: &Moto, target_group: &str) -> Vec<String> {
    attached_in(&asgs(moto), target_group)
}

/// The ImageId of every running instance of the group.
fn images_in(all: &serde_json::Value, group: &str) -> Vec<String> {
    serde_json::from_value(all[group]["InstanceImages"].clone()).unwrap_or_default()
}

fn instance_images(moto: &Moto, group: &str) -> Vec<String> {
    images_in(&asgs(moto), group)
}

fn template_data(moto: &Moto, group: &str) -> serde_json::Value {
    asgs(moto)[group]["Template"].clone()
}

fn pointer(moto: &Moto, name: &str) -> (String, String, String) {
    let out = moto.boto3(&format!(
        "p = ssm.get_parameter(Name='{name}')['Parameter']\n\
         d = ssm.describe_parameters(ParameterFilters=[{{'Key': 'Name', 'Values': ['{name}']}}])['Parameters'][0]\n\
         print(json.dumps([p['Value'], p['DataType'], d.get('Description', '')]))"
    ));
    let v: (String, String, String) = serde_json::from_str(&out).unwrap();
    v
}

/// The AMI id of `digest` in us-east-1, found by its tag.
fn ami_of(moto: &Moto, digest: &str) -> String {
    let images = moto::app::images_tagged(moto, "kiln:digest", digest);
    images.as_array().unwrap().iter().map(|i| i["ImageId"].as_str().unwrap().to_string()).next().unwrap()
}

/// Checks everything a deployed group must be: its template version's data, its size and health checks, its tags,
/// and that its instances run `ami`.
fn assert_group(moto: &Moto, net: &Network, group: &str, stage: &str, digest: &str, ami: &str, capacity: u64) {
    let all = asgs(moto);
    let g = &all[group];
    assert!(g.is_object(), "group {group} does not exist: {}", all);
    for field in ["MinSize", "MaxSize", "DesiredCapacity"] {
        assert_eq!(g[field].as_u64(), Some(capacity), "{group} {field}: {g}");
    }
    assert_eq!(g["HealthCheckType"], "ELB", "{g}");
    let subnets: Vec<&str> = g["VPCZoneIdentifier"].as_str().unwrap().split(',').collect();
    assert_eq!(subnets, net.subnets.iter().map(String::as_str).collect::<Vec<_>>(), "{g}");
    for (key, value) in
        [("kiln:pipeline", "hello-aws"), ("kiln:stage", stage), ("kiln:digest", digest), ("kiln:group", group)]
    {
        let t = g["Tags"].as_array().unwrap().iter().find(|t| t["Key"] == key).unwrap_or_else(|| panic!("{key}: {g}"));
        assert_eq!((t["Value"].as_str(), t["PropagateAtLaunch"].as_bool()), (Some(value), Some(true)), "{key}: {g}");
    }
    let template = &g["Template"];
    assert_eq!(template["name"], format!("kiln-hello-aws-{stage}"));
    let data = &template["data"];
    assert_eq!(data["ImageId"], ami, "{data}");
    assert_eq!(data["InstanceType"], "t3.small", "{data}");
    assert_eq!(data["MetadataOptions"]["HttpTokens"], "required", "IMDSv2: {data}");
    let devices = data["BlockDeviceMappings"].as_array().unwrap();
    assert!(!devices.is_empty() && devices.iter().all(|d| d["Ebs"]["Encrypted"] == true), "encrypted: {data}");
    assert_eq!(data["SecurityGroupIds"], serde_json::json!([net.security_group]), "{data}");
    assert_eq!(data["IamInstanceProfile"]["Name"], "hello", "the stage's instance profile: {data}");
    let instance_tags = data["TagSpecifications"].as_array().unwrap().iter().find(|s| s["ResourceType"] == "instance");
    let instance_tags = instance_tags.unwrap_or_else(|| panic!("no instance tags: {data}"));
    assert_eq!(tag(instance_tags, "kiln:digest"), Some(digest), "{data}");
    assert_eq!(tag(instance_tags, "kiln:group"), Some(group), "{data}");
    let images = images_in(&all, group);
    assert_eq!(images.len() as u64, capacity, "{group}'s instances: {images:?}");
    assert!(images.iter().all(|i| i == ami), "{group}'s instances run {images:?}, not {ami}");
}

/// `images/files/hello/main.rs` changed, so the next bake is another image; returns its digest.
fn bake_another(moto: &Moto, repo: &Repo, marker: &str) -> String {
    let main = repo.file("images/files/hello/main.rs");
    let mut text = std::fs::read_to_string(&main).unwrap();
    text.push_str(&format!("\n// {marker}\n"));
    std::fs::write(&main, text).unwrap();
    at(moto, repo, NOW, "ci", &["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string()
}

#[test]
fn the_hello_aws_pipeline_end_to_end() {
    let moto = Moto::start();
    let (repo, net) = hello_aws(&moto);
    let (dev_tg, test_tg, prod_tg) = (&net.target_groups[0], &net.target_groups[1], &net.target_groups[2]);

    // Bake: the base resolves to the newest Amazon Linux 2023 that moto has, hello is baked on it.
    let v1 = at(&moto, &repo, NOW, "ci", &["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    let ami1 = ami_of(&moto, &v1);

    // dev: the smoke gate passes and the promotion deploys group v001, the only one in dev's target group.
    let dev = at(&moto, &repo, NOW, "ci", &["promote", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(dev["outcome"], "promoted", "{dev}");
    assert_eq!(dev["deployment"]["outcome"], "deployed", "{dev}");
    assert_group(&moto, &net, "hello-aws-dev-v001", "dev", &v1, &ami1, 2);
    assert_eq!(attached(&moto, dev_tg), ["hello-aws-dev-v001"]);
    assert_eq!(pointer(&moto, "/kiln/hello-aws/dev"), (ami1.clone(), "aws:ec2:image".into(), v1.clone()));

    // test soaks 10 minutes after dev went live: refused now, promoted 11 minutes later.
    let early = at(&moto, &repo, NOW, "ci", &["promote", "--stage", "test"]).expect(3);
    assert!(early.stderr.contains("soak"), "{}", early.stderr);
    at(&moto, &repo, LATER, "ci", &["promote", "--stage", "test"]).ok();
    assert_group(&moto, &net, "hello-aws-test-v001", "test", &v1, &ami1, 2);
    assert_eq!(attached(&moto, test_tg), ["hello-aws-test-v001"]);

    // prod needs one approval; then it gets 3 instances, a copy in eu-west-1 and both pointers.
    let unapproved = at(&moto, &repo, LATER, "ci", &["promote", "--stage", "prod"]).expect(3);
    assert!(unapproved.stderr.contains("approv"), "{}", unapproved.stderr);
    at(&moto, &repo, LATER, "ana", &["approve", "--stage", "prod", "--digest", &v1]).ok();
    at(&moto, &repo, LATER, "ci", &["promote", "--stage", "prod"]).ok();
    assert_group(&moto, &net, "hello-aws-prod-v001", "prod", &v1, &ami1, 3);
    assert_eq!(attached(&moto, prod_tg), ["hello-aws-prod-v001"]);
    assert_eq!(pointer(&moto, "/kiln/hello-aws/prod"), (ami1.clone(), "aws:ec2:image".into(), v1.clone()));

    // A second image in dev: group v002 takes the traffic, v001 is parked (dev keeps one previous group), with its
    // launch template version.
    let v2 = bake_another(&moto, &repo, "v002");
    let ami2 = ami_of(&moto, &v2);
    at(&moto, &repo, LATER, "ci", &["promote", "--stage", "dev"]).ok();
    assert_group(&moto, &net, "hello-aws-dev-v002", "dev", &v2, &ami2, 2);
    assert_eq!(attached(&moto, dev_tg), ["hello-aws-dev-v002"]);
    let parked = &asgs(&moto)["hello-aws-dev-v001"];
    assert_eq!((parked["DesiredCapacity"].as_u64(), parked["MaxSize"].as_u64()), (Some(0), Some(0)), "{parked}");
    assert_eq!(template_data(&moto, "hello-aws-dev-v001")["data"]["ImageId"], ami1.as_str());
    assert_eq!(pointer(&moto, "/kiln/hello-aws/dev").0, ami2);

    // Rollback: the kept group is scaled back up and takes the traffic; the pointer names v1 again.
    at(&moto, &repo, LATER, "oncall", &["rollback", "--stage", "dev", "--reason", "v2 is slow"]).ok();
    assert_group(&moto, &net, "hello-aws-dev-v001", "dev", &v1, &ami1, 2);
    assert_eq!(attached(&moto, dev_tg), ["hello-aws-dev-v001"]);
    assert_eq!(pointer(&moto, "/kiln/hello-aws/dev"), (ami1.clone(), "aws:ec2:image".into(), v1.clone()));
    let after_rollback = asgs(&moto);
    assert_eq!(after_rollback["hello-aws-dev-v002"]["DesiredCapacity"].as_u64(), Some(0), "v002 parked");
    at(&moto, &repo, LATER, "ci", &["verify"]).ok();

    // A third image pushes the oldest kept group out: deleted with its launch template version.
    // moto has no DeleteLaunchTemplateVersions: kiln says which version stays and finishes the deploy.
    let v3 = bake_another(&moto, &repo, "v003");
    let third = at(&moto, &repo, LATER, "ci", &["promote", "--stage", "dev"]).ok();
    let names = group_names_of(&moto, "hello-aws-dev-");
    assert_eq!(names, ["hello-aws-dev-v001", "hello-aws-dev-v003"], "the new group and the one kept");
    assert_eq!(attached(&moto, dev_tg), ["hello-aws-dev-v003"]);
    assert_eq!(instance_images(&moto, "hello-aws-dev-v003"), vec![ami_of(&moto, &v3); 2]);
    assert_eq!(asgs(&moto)["hello-aws-dev-v001"]["DesiredCapacity"].as_u64(), Some(0), "v001 parked again");
    assert!(
        third.stderr.contains("cannot delete launch template versions")
            && third.stderr.contains("of kiln-hello-aws-dev stays"),
        "{}",
        third.stderr
    );

    // Revoke what dev runs: a deploy of it is refused, and nothing in AWS changes.
    let before = asgs(&moto);
    at(&moto, &repo, LATER, "sec", &["revoke", &v3, "--reason", "CVE-2026-0002"]).ok();
    let refused = at(&moto, &repo, LATER, "ci", &["deploy", "--stage", "dev"]).expect(3);
    assert!(refused.stderr.contains("it is revoked: CVE-2026-0002"), "{}", refused.stderr);
    let after = asgs(&moto);
    assert_eq!(
        before.as_object().unwrap().keys().collect::<Vec<_>>(),
        after.as_object().unwrap().keys().collect::<Vec<_>>()
    );

    // gc: the images every stage can return to stay.
    at(&moto, &repo, LATER, "ci", &["gc"]).ok();
    for digest in [&v1, &v2] {
        assert_eq!(
            moto::app::images_tagged(&moto, "kiln:digest", digest).as_array().unwrap().len(),
            1,
            "{digest} stays"
        );
    }
    at(&moto, &repo, LATER, "ci", &["verify"]).ok();
}

/// The test application (`moto::app`) with its pipeline rewritten for deploys: dev and prod each behind their own
/// target group, one instance each; dev with `dev_extra` (a window, checks) added to its table.
fn app(moto: &Moto, dev_extra: &str) -> (Repo, Network) {
    let repo = moto::app::aws_repo(moto);
    let net = network(moto, &["dev", "prod"]);
    let subnets = net.subnets.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    write_pipeline(
        &repo,
        &format!(
            r#"[[stage]]
name = "dev"
capacity = 1
{dev_extra}
[stage.deploy]
target-group-arn = "{dev}"
subnets = [{subnets}]

[[stage]]
name = "prod"
capacity = 1
[stage.deploy]
target-group-arn = "{prod}"
subnets = [{subnets}]
"#,
            dev = net.target_groups[0],
            prod = net.target_groups[1],
        ),
    );
    (repo, net)
}

/// Bakes the app with `config.txt` saying `mode`, promotes it to dev without deploying; returns its digest.
fn app_release(moto: &Moto, repo: &Repo, mode: &str) -> String {
    repo.write("images/files/app/config.txt", &format!("mode={mode}\n"));
    let digest = moto::app::bake(moto, repo, &[])["digest"].as_str().unwrap().to_string();
    moto::app::run(moto, repo, &["promote", "--stage", "dev", "--no-deploy"]).ok();
    digest
}

fn set_alarm(moto: &Moto, name: &str, state: &str) {
    moto.boto3(&format!(
        "client('cloudwatch').set_alarm_state(AlarmName='{name}', StateValue='{state}', StateReason='set by the test')"
    ));
}

fn put_alarm(moto: &Moto, name: &str) {
    moto.boto3(&format!(
        "client('cloudwatch').put_metric_alarm(AlarmName='{name}', MetricName='HTTPCode_Target_5XX_Count', \
         Namespace='AWS/ApplicationELB', Statistic='Sum', Period=60, EvaluationPeriods=1, Threshold=1, \
         ComparisonOperator='GreaterThanOrEqualToThreshold')"
    ));
    set_alarm(moto, name, "OK");
}

fn ledger_events(moto: &Moto, repo: &Repo) -> Vec<serde_json::Value> {
    let log = moto::app::run(moto, repo, &["log", "--json", "--limit", "100000"]).ok().json();
    let mut all = log["events"].as_array().unwrap().clone();
    all.reverse();
    all
}

#[test]
fn an_alarm_that_fires_inside_the_window_sends_traffic_back_to_the_previous_group() {
    let moto = Moto::start();
    let (repo, net) = app(&moto, "verify-for = \"1s\"\n[[stage.verify]]\nalarm = \"hello-5xx\"\n");
    let dev_tg = &net.target_groups[0];
    put_alarm(&moto, "hello-5xx");

    // The alarm stays OK through the window: the deploy passes.
    let first = app_release(&moto, &repo, "one");
    let deployed = moto::app::run(&moto, &repo, &["deploy", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(deployed["outcome"], "deployed", "{deployed}");
    assert_eq!(attached(&moto, dev_tg), ["app-dev-v001"]);
    assert!(ledger_events(&moto, &repo).iter().any(|e| e["step"] == "verified"));

    // The next release: kiln stops once the window has begun, the alarm fires, kiln goes on.
    let second = app_release(&moto, &repo, "two");
    assert_ne!(first, second);
    let child = moto
        .kiln(&repo)
        .env("KILN_FAULT", "stop:deploy:after-verifying")
        .args(["deploy", "--stage", "dev", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::hello::wait_stopped(child.id());
    assert_eq!(attached(&moto, dev_tg), ["app-dev-v002"], "the window watches the new group serving");
    set_alarm(&moto, "hello-5xx", "ALARM");
    common::hello::signal(child.id(), "CONT");
    let failed = Run::of(child.wait_with_output().unwrap(), &["deploy (alarm fires)"]).expect(4);
    assert!(failed.stderr.contains("alarm hello-5xx is ALARM"), "{}", failed.stderr);
    assert!(failed.stderr.contains("traffic moved back to group app-dev-v001"), "{}", failed.stderr);

    // Traffic is back on the previous group, the new one is gone, and the ledger says why.
    assert_eq!(attached(&moto, dev_tg), ["app-dev-v001"]);
    assert_eq!(group_names_of(&moto, "app-dev-"), ["app-dev-v001"]);
    assert_eq!(asgs(&moto)["app-dev-v001"]["DesiredCapacity"].as_u64(), Some(1));
    let events = ledger_events(&moto, &repo);
    let verification = events.iter().find(|e| e["step"] == "verification-failed").expect("recorded");
    assert_eq!(verification["detail"]["evidence"]["state"], "ALARM", "{verification}");
    let restored = events.iter().find(|e| e["step"] == "traffic-restored").expect("recorded");
    assert_eq!(restored["detail"]["group"], "app-dev-v001");
    assert!(events.iter().any(|e| e["kind"] == "deploy-failed"), "{events:#?}");
    let status = moto::app::run(&moto, &repo, &["status", "--json"]).ok().json();
    assert_eq!(status["stages"][0]["live"]["digest"], first.as_str(), "{status}");
}

#[test]
fn an_alarm_that_does_not_exist_is_refused_before_anything_is_touched() {
    let moto = Moto::start();
    let (repo, net) = app(&moto, "verify-for = \"1s\"\n[[stage.verify]]\nalarm = \"no-such-alarm\"\n");
    app_release(&moto, &repo, "one");
    let before = ledger_events(&moto, &repo).len();
    let refused = moto::app::run(&moto, &repo, &["deploy", "--stage", "dev"]).expect(2);
    assert!(refused.stderr.contains("there is no CloudWatch alarm `no-such-alarm` in us-east-1"), "{}", refused.stderr);
    assert_eq!(ledger_events(&moto, &repo).len(), before, "nothing recorded");
    assert_eq!(asgs(&moto), serde_json::json!({}), "no group");
    assert!(attached(&moto, &net.target_groups[0]).is_empty());
}

#[test]
fn kiln_down_is_refused_on_aws_and_changes_nothing() {
    let moto = Moto::start();
    let (repo, net) = app(&moto, "");
    app_release(&moto, &repo, "one");
    moto::app::run(&moto, &repo, &["deploy", "--stage", "dev"]).ok();
    let before = (asgs(&moto), ledger_events(&moto, &repo).len());
    let refused = moto::app::run(&moto, &repo, &["down", "--stage", "dev"]).expect(2);
    assert!(refused.stderr.contains("on AWS, retiring stage dev is `kiln gc`'s job"), "{}", refused.stderr);
    assert_eq!((asgs(&moto), ledger_events(&moto, &repo).len()), before);
    assert_eq!(attached(&moto, &net.target_groups[0]), ["app-dev-v001"]);
}

#[test]
fn verify_finds_an_instance_relaunched_from_another_ami_a_rewritten_pointer_and_a_deregistered_ami() {
    let moto = Moto::start();
    let (repo, _) = app(&moto, "");
    let digest = app_release(&moto, &repo, "one");
    moto::app::run(&moto, &repo, &["deploy", "--stage", "dev"]).ok();
    let ami = ami_of(&moto, &digest);
    assert_eq!(instance_images(&moto, "app-dev-v001"), [ami.as_str()]);
    moto::app::run(&moto, &repo, &["verify"]).ok();

    // Someone points the group at a template version with another AMI and replaces its instance: the group's
    // tags still name kiln's digest, and only the instance says what it runs.
    let replaced = moto.boto3(&format!(
        "asg = client('autoscaling')\n\
         g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=['app-dev-v001'])['AutoScalingGroups'][0]\n\
         tid = g['LaunchTemplate']['LaunchTemplateId']\n\
         v = ec2.create_launch_template_version(LaunchTemplateId=tid, LaunchTemplateData={{'ImageId': '{other}', 'InstanceType': 't3.micro'}})['LaunchTemplateVersion']['VersionNumber']\n\
         asg.update_auto_scaling_group(AutoScalingGroupName='app-dev-v001', LaunchTemplate={{'LaunchTemplateId': tid, 'Version': str(v)}})\n\
         old = g['Instances'][0]['InstanceId']\n\
         asg.terminate_instance_in_auto_scaling_group(InstanceId=old, ShouldDecrementDesiredCapacity=False)\n\
         g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=['app-dev-v001'])['AutoScalingGroups'][0]\n\
         print([i['InstanceId'] for i in g['Instances'] if i['InstanceId'] != old][0])",
        other = moto::app::PRELOADED_AMI
    ));
    let replaced = replaced.trim();
    assert_eq!(instance_images(&moto, "app-dev-v001"), [moto::app::PRELOADED_AMI], "moto relaunched from the new AMI");
    assert!(tag(&asgs(&moto)["app-dev-v001"], "kiln:digest").is_some_and(|d| d == digest), "the tag still agrees");

    let drift = moto::app::run(&moto, &repo, &["verify"]).expect(6);
    let said = format!("{}{}", drift.stdout, drift.stderr);
    assert!(
        said.contains(&format!(
            "instance {replaced} of group app-dev-v001 runs {}, not {ami}",
            moto::app::PRELOADED_AMI
        )),
        "{said}"
    );

    // The stage pointer rewritten by hand, and the AMI deregistered: both are drift too.
    moto.boto3(&format!(
        "ssm.put_parameter(Name='/kiln/app/dev', Value='{other}', Type='String', DataType='aws:ec2:image', \
         Description='sha256:{zeros}', Overwrite=True)\n\
         ec2.deregister_image(ImageId='{ami}')",
        other = moto::app::PRELOADED_AMI,
        zeros = "0".repeat(64)
    ));
    let drift = moto::app::run(&moto, &repo, &["verify"]).expect(6);
    let said = format!("{}{}", drift.stdout, drift.stderr);
    let short = &digest["sha256:".len().."sha256:".len() + 12];
    for wanted in [
        format!("image us-east-1/{ami} no longer matches its digest: us-east-1/{ami} no longer exists"),
        "it is still promoted to app/dev, live in app/dev, kept by group app-dev-v001 of app/dev".to_string(),
        format!("stage dev: its stage pointer names 000000000000, but the ledger recorded {short}"),
        format!("instance {replaced} of group app-dev-v001 runs"),
    ] {
        assert!(said.contains(&wanted), "{wanted}\n--- in\n{said}");
    }
}

/// Asserts dev converged on `digest`: one group attached, running its AMI at capacity; at most one other, parked.
fn assert_dev_converged(moto: &Moto, repo: &Repo, net: &Network, digest: &str, context: &str) {
    let ami = ami_of(moto, digest);
    let all = asgs(moto);
    let serving = attached_in(&all, &net.target_groups[0]);
    assert_eq!(serving.len(), 1, "{context}: attached {serving:?}");
    assert_eq!(images_in(&all, &serving[0]), [ami.as_str()], "{context}: {} runs", serving[0]);
    let others: Vec<_> =
        all.as_object().unwrap().iter().filter(|(n, _)| n.starts_with("app-dev-") && **n != serving[0]).collect();
    assert!(others.len() <= 1, "{context}: {:?}", others.iter().map(|(n, _)| n).collect::<Vec<_>>());
    for (name, group) in others {
        assert_eq!(group["DesiredCapacity"].as_u64(), Some(0), "{context}: {name} is parked");
    }
    let status = moto::app::run(moto, repo, &["status", "--json"]).ok().json();
    assert_eq!(status["stages"][0]["live"]["digest"], digest, "{context}: {status}");
    assert_eq!(status["stages"][0]["live"]["group"], serving[0].as_str(), "{context}: {status}");
    moto::app::run(moto, repo, &["verify"]).ok();
}

#[test]
fn a_group_that_never_becomes_healthy_is_deleted_and_the_old_group_keeps_serving() {
    let moto = Moto::start();
    let (repo, net) = app(&moto, "");
    let first = app_release(&moto, &repo, "one");
    moto::app::run(&moto, &repo, &["deploy", "--stage", "dev"]).ok();
    app_release(&moto, &repo, "two");

    let failed = moto
        .kiln(&repo)
        .env("KILN_INJECT", "health=unhealthy:targets never healthy")
        .args(["deploy", "--stage", "dev"])
        .output()
        .unwrap();
    let failed = Run::of(failed, &["deploy (unhealthy)"]).expect(4);
    assert!(failed.stderr.contains("targets never healthy"), "{}", failed.stderr);
    assert_eq!(group_names_of(&moto, "app-dev-"), ["app-dev-v001"], "the new group is deleted");
    assert_dev_converged(&moto, &repo, &net, &first, "after an unhealthy group");
}

#[test]
fn throttling_on_update_auto_scaling_group_is_retried() {
    let moto = Moto::start();
    let (repo, net) = app(&moto, "");
    app_release(&moto, &repo, "one");
    moto::app::run(&moto, &repo, &["deploy", "--stage", "dev"]).ok();
    let second = app_release(&moto, &repo, "two");
    // Parking the old group is the deploy's UpdateAutoScalingGroup: its first two answers are throttled.
    moto.start_recording();
    let deploy = moto
        .kiln(&repo)
        .env("KILN_INJECT", "aws.UpdateAutoScalingGroup#1=throttle,aws.UpdateAutoScalingGroup#2=throttle")
        .args(["deploy", "--stage", "dev"])
        .output()
        .unwrap();
    Run::of(deploy, &["deploy (throttled)"]).ok();
    let calls = moto.stop_recording();
    let updates = calls.iter().filter(|c| *c == "autoscaling:UpdateAutoScalingGroup").count();
    assert_eq!(updates, 1, "the throttled attempts never reached moto, the third did: {calls:?}");
    assert_dev_converged(&moto, &repo, &net, &second, "after throttling");
}

#[test]
fn a_kiln_killed_after_any_deploy_step_is_converged_by_the_next_deploy() {
    let moto = Moto::start();
    let (repo, net) = app(&moto, "");
    app_release(&moto, &repo, "zero");
    moto::app::run(&moto, &repo, &["deploy", "--stage", "dev"]).ok();
    for step in [
        "after-started",
        "after-group-created",
        "after-healthy",
        "after-traffic-switched",
        "after-drained",
        "after-retired",
    ] {
        let digest = app_release(&moto, &repo, step);
        let killed = moto
            .kiln(&repo)
            .env("KILN_FAULT", format!("deploy:{step}"))
            .args(["deploy", "--stage", "dev"])
            .output()
            .unwrap();
        let killed = Run::of(killed, &["deploy (killed)"]);
        assert_eq!(killed.code, -1, "killed at {step}: {}", killed.stderr);
        moto::app::run(&moto, &repo, &["deploy", "--stage", "dev"]).ok();
        assert_dev_converged(&moto, &repo, &net, &digest, step);
    }
}

/// Whether an AWS operation only reads (`service:Operation`, as the recorder names it).
fn reads_only(op: &str) -> bool {
    let operation = op.rsplit(':').next().unwrap_or(op);
    ["Describe", "Get", "List", "Head"].iter().any(|read| operation.starts_with(read))
}

#[test]
fn a_kiln_stopped_past_its_lease_on_aws_is_taken_over_and_makes_no_change_once_resumed() {
    let moto = Moto::start();
    let (repo, net) = app(&moto, "lease = \"2s\"\n");
    // The ledger in S3 as well, as CI runners share it: a write by the first kiln would be a PutObject.
    repo.edit(
        "pipelines/app.toml",
        "provider = \"aws\"\n",
        "provider = \"aws\"\nledger = \"s3://kiln-artifacts/ledger\"\n",
    );
    let dev_tg = &net.target_groups[0];
    app_release(&moto, &repo, "zero");
    moto::app::run(&moto, &repo, &["deploy", "--stage", "dev"]).ok();

    // Stopped before traffic moved, the first's deployment is undone; stopped after, it is finished by the second.
    // After `healthy` the first's next act is a fenced route, with no ledger write before it.
    for (stop, taken_over_as) in [
        ("after-group-created", "undid interrupted deployment"),
        ("after-healthy", "undid interrupted deployment"),
        ("after-traffic-switched", "finished interrupted deployment"),
    ] {
        let digest = app_release(&moto, &repo, stop);
        let first = moto
            .kiln(&repo)
            .env("KILN_ACTOR", "first")
            .env("KILN_FAULT", format!("stop:deploy:{stop}"))
            .args(["deploy", "--stage", "dev"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        common::hello::wait_stopped(first.id());
        // Past the 2s lease, which was taken before the stop.
        std::thread::sleep(std::time::Duration::from_millis(2500));

        let second =
            moto.kiln(&repo).env("KILN_ACTOR", "second").args(["deploy", "--stage", "dev", "--json"]).output().unwrap();
        let second = Run::of(second, &["deploy (second)"]).ok().json();
        assert!(second["reconciled"].as_str().unwrap_or_default().contains(taken_over_as), "{stop}: {second}");
        let group = second["group"].as_str().unwrap().to_string();
        assert_eq!(attached(&moto, dev_tg), [group.as_str()], "{stop}: the second's group serves");
        let head = ledger_events(&moto, &repo);

        // Resumed, the first finds its lease gone before its next call: AWS sees reads at most.
        moto.start_recording();
        common::hello::signal(first.id(), "CONT");
        let resumed = Run::of(first.wait_with_output().unwrap(), &["deploy (first)"]).expect(5);
        let calls = moto.stop_recording();
        eprintln!("{stop}: the first kiln, resumed after the takeover, called: {}", tally(&calls));
        assert!(resumed.stderr.contains("was taken over by second"), "{stop}: {}", resumed.stderr);
        let changes: Vec<&String> = calls.iter().filter(|op| !reads_only(op)).collect();
        assert!(changes.is_empty(), "{stop}: the first kiln changed AWS after it was taken over: {changes:?}");

        // Nothing moved: the ledger's head, the serving group, what runs.
        let after = ledger_events(&moto, &repo);
        assert_eq!(after.len(), head.len(), "{stop}: the first kiln wrote: {:#?}", &after[head.len()..]);
        assert_eq!(after.last().map(|e| &e["seq"]), head.last().map(|e| &e["seq"]));
        assert_eq!(attached(&moto, dev_tg), [group.as_str()], "{stop}");
        assert_dev_converged(&moto, &repo, &net, &digest, stop);
    }
}

/// `ops` with repeats folded: `ec2:X, s3:GetObject ×3, …`, in order of first appearance.
fn tally(ops: &[String]) -> String {
    let mut counted: Vec<(&str, usize)> = Vec::new();
    for op in ops {
        match counted.iter_mut().find(|(seen, _)| seen == op) {
            Some((_, n)) => *n += 1,
            None => counted.push((op, 1)),
        }
    }
    counted
        .iter()
        .map(|(op, n)| if *n == 1 { op.to_string() } else { format!("{op} ×{n}") })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The wait polls among `ops`: a wait reads the group (DescribeAutoScalingGroups) and its targets
/// (DescribeTargetHealth) until they settle, so in a run of such read pairs with nothing else between them every
/// pair after the first is a poll, and both its calls count.
fn wait_polls(ops: &[String]) -> usize {
    let read = |i: usize| {
        ops.get(i).is_some_and(|op| op == "autoscaling:DescribeAutoScalingGroups")
            && ops.get(i + 1).is_some_and(|op| op == "elasticloadbalancing:DescribeTargetHealth")
    };
    let (mut polls, mut i) = (0, 0);
    while i < ops.len() {
        if read(i) {
            let mut j = i + 2;
            while read(j) {
                polls += 2;
                j += 2;
            }
            i = j;
        } else {
            i += 1;
        }
    }
    polls
}

#[test]
fn wait_polls_are_the_repeated_reads_of_a_wait() {
    let ops = |s: &str| s.split(' ').map(|op| op.to_string()).collect::<Vec<_>>();
    let (group, targets) = ("autoscaling:DescribeAutoScalingGroups", "elasticloadbalancing:DescribeTargetHealth");
    assert_eq!(wait_polls(&ops(&format!("{group} {targets}"))), 0);
    assert_eq!(wait_polls(&ops(&format!("{group} {targets} {group} {targets} {group} {targets}"))), 4);
    assert_eq!(wait_polls(&ops(&format!("{group} {targets} x:Route {group} {targets}"))), 0, "two waits");
    assert_eq!(wait_polls(&ops(&format!("{group} {group} {targets} {group}"))), 0);
}

/// Runs kiln with moto's recorder on; returns the run and the AWS operations it called, in order.
fn recorded(moto: &Moto, repo: &Repo, what: &str, args: &[&str]) -> (Run, Vec<String>) {
    moto.start_recording();
    let run = moto::app::run(moto, repo, args);
    let ops = moto.stop_recording();
    let polls = wait_polls(&ops);
    eprintln!("B6 {what}: {} calls ({polls} polls): {}", ops.len(), tally(&ops));
    (run, ops)
}

fn count(ops: &[String], op: &str) -> usize {
    ops.iter().filter(|o| *o == op).count()
}

#[test]
fn b6_api_calls_per_promotion_deploy_and_rollback() {
    let moto = Moto::start();
    let (repo, net) = app(&moto, "");
    let dev_tg = &net.target_groups[0];
    repo.write("images/files/app/config.txt", "mode=one\n");
    moto::app::bake(&moto, &repo, &[]);

    // A promotion alone (gates, the stage pointer): no deploy call.
    let (run, promote) =
        recorded(&moto, &repo, "promote to dev (--no-deploy)", &["promote", "--stage", "dev", "--no-deploy"]);
    run.ok();
    assert_eq!(count(&promote, "ssm:PutParameter"), 1, "{promote:?}");
    assert!(!promote.iter().any(|op| op.starts_with("autoscaling:Create")), "{promote:?}");
    assert!(promote.len() <= 6, "{promote:?}");

    // The first deploy into an empty stage: a template, a group, its wait, the cutover.
    let (run, first) = recorded(&moto, &repo, "first deploy (new template and group)", &["deploy", "--stage", "dev"]);
    run.ok();
    assert_eq!(count(&first, "ec2:CreateLaunchTemplate"), 1, "{first:?}");
    assert_eq!(count(&first, "autoscaling:CreateAutoScalingGroup"), 1, "{first:?}");
    assert!(first.len() - wait_polls(&first) <= 20, "{first:?}");
    assert_eq!(attached(&moto, dev_tg), ["app-dev-v001"]);

    // The next release: a template version, a group, the cutover, the old group drained and parked.
    repo.write("images/files/app/config.txt", "mode=two\n");
    moto::app::bake(&moto, &repo, &[]);
    moto::app::run(&moto, &repo, &["promote", "--stage", "dev", "--no-deploy"]).ok();
    let (run, next) = recorded(&moto, &repo, "deploy replacing a group", &["deploy", "--stage", "dev"]);
    run.ok();
    assert_eq!(count(&next, "ec2:CreateLaunchTemplateVersion"), 1, "{next:?}");
    assert_eq!(count(&next, "autoscaling:UpdateAutoScalingGroup"), 1, "the park: {next:?}");
    assert!(next.len() - wait_polls(&next) <= 25, "{next:?}");
    assert_eq!(attached(&moto, dev_tg), ["app-dev-v002"]);

    // Rollback: the kept group scaled back up, the pointer moved, the cutover, v002 parked.
    let (run, rollback) = recorded(&moto, &repo, "rollback (kept group scaled up)", &["rollback", "--stage", "dev"]);
    run.ok();
    assert_eq!(count(&rollback, "autoscaling:CreateAutoScalingGroup"), 0, "{rollback:?}");
    assert_eq!(count(&rollback, "autoscaling:UpdateAutoScalingGroup"), 2, "scale up v001, park v002: {rollback:?}");
    assert_eq!(count(&rollback, "ssm:PutParameter"), 1, "{rollback:?}");
    assert!(rollback.len() - wait_polls(&rollback) <= 25, "{rollback:?}");
    assert_eq!(attached(&moto, dev_tg), ["app-dev-v001"]);

    // A promotion that deploys: the promotion's calls and the deploy's, in one command.
    repo.write("images/files/app/config.txt", "mode=three\n");
    moto::app::bake(&moto, &repo, &[]);
    let (run, both) = recorded(&moto, &repo, "promote to dev with its deploy", &["promote", "--stage", "dev"]);
    run.ok();
    assert!(both.len() - wait_polls(&both) <= 30, "{both:?}");
    assert_eq!(attached(&moto, dev_tg), ["app-dev-v003"]);

    // moto's targets are healthy at once, so the waits above read once each. Here the new group's instance is
    // stopped (its target `unused`) once the group exists, and started again 3s later: kiln's first read finds it
    // unhealthy, so it must poll. The test's own calls (EC2 instance calls, which a deploy never makes) are left out.
    repo.write("images/files/app/config.txt", "mode=four\n");
    moto::app::bake(&moto, &repo, &[]);
    moto::app::run(&moto, &repo, &["promote", "--stage", "dev", "--no-deploy"]).ok();
    moto.start_recording();
    let slow = moto
        .kiln(&repo)
        .env("KILN_FAULT", "stop:deploy:after-group-created")
        .args(["deploy", "--stage", "dev"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::hello::wait_stopped(slow.id());
    moto.boto3(
        "r = ec2.describe_instances(Filters=[{'Name': 'tag:kiln:group', 'Values': ['app-dev-v004']}])['Reservations']\n\
         ec2.stop_instances(InstanceIds=[i['InstanceId'] for x in r for i in x['Instances']])",
    );
    common::hello::signal(slow.id(), "CONT");
    std::thread::sleep(std::time::Duration::from_secs(3));
    moto.boto3(
        "r = ec2.describe_instances(Filters=[{'Name': 'tag:kiln:group', 'Values': ['app-dev-v004']}])['Reservations']\n\
         ec2.start_instances(InstanceIds=[i['InstanceId'] for x in r for i in x['Instances']])",
    );
    Run::of(slow.wait_with_output().unwrap(), &["deploy (slow target)"]).ok();
    let ops: Vec<String> = moto
        .stop_recording()
        .into_iter()
        .filter(|op| !["ec2:DescribeInstances", "ec2:StopInstances", "ec2:StartInstances"].contains(&op.as_str()))
        .collect();
    let polls = wait_polls(&ops);
    eprintln!("B6 deploy whose target turns healthy after ~3s: {} calls ({polls} polls): {}", ops.len(), tally(&ops));
    assert!(polls >= 2, "the first read found the target stopped, so kiln read again: {ops:?}");
    assert!(ops.len() - polls <= 30, "it also destroys the group beyond keep-previous: {ops:?}");
    assert_eq!(attached(&moto, dev_tg), ["app-dev-v004"]);
}
