//! Distribution, the content gate and gc on AWS against moto with the real binary: promotion copies an image to
//! the stage's other regions and shares it with its accounts (never publicly), re-checks every copy before relying
//! on it, and gc deletes only what nothing needs. What kiln made is checked with boto3, never through kiln's code.

mod common;
mod moto;

use common::Repo;
use moto::app::{aws_repo, bake, builders, run, tag, PRELOADED_AMI};
use moto::Moto;

const OTHER_ACCOUNT: &str = "111122223333";
const OTHER_REGION: &str = "eu-west-1";

/// The test application with one stage, prod, in `deploy`'s regions and accounts. Prod is the first stage so that
/// it has no upstream gate: passing one needs a healthy deployment in dev, and these tests deploy nothing.
fn prod_only_repo(moto: &Moto, deploy: &str) -> Repo {
    let repo = aws_repo(moto);
    let pipeline = std::fs::read_to_string(repo.file("pipelines/app.toml")).unwrap();
    let (settings, _) = pipeline.split_once("[[stage]]").unwrap();
    repo.write(
        "pipelines/app.toml",
        &format!("{settings}[[stage]]\nname = \"prod\"\ndeploy = {{ subnets = [\"subnet-00000001\"]{deploy} }}\n"),
    );
    repo
}

fn distributed_repo(moto: &Moto) -> Repo {
    prod_only_repo(moto, &format!(r#", regions = ["us-east-1", "{OTHER_REGION}"], accounts = ["{OTHER_ACCOUNT}"]"#))
}

fn events(moto: &Moto, repo: &Repo) -> Vec<serde_json::Value> {
    let log = run(moto, repo, &["log", "--json"]).ok().json();
    let events = log.as_array().or(log["events"].as_array()).unwrap_or_else(|| panic!("no events in {log}"));
    events.clone()
}

fn kinds(events: &[serde_json::Value]) -> Vec<String> {
    events.iter().map(|e| e["kind"].as_str().unwrap_or_default().to_string()).collect()
}

fn count_kind(events: &[serde_json::Value], kind: &str) -> usize {
    kinds(events).iter().filter(|k| *k == kind).count()
}

/// The AMIs this account owns in `region` carrying `digest`, as boto3 sees them.
fn amis_with_digest(moto: &Moto, region: &str, digest: &str) -> Vec<serde_json::Value> {
    let out = moto.boto3(&format!(
        "print(json.dumps(client('ec2', '{region}').describe_images(Owners=['self'], \
         Filters=[{{'Name': 'tag:kiln:digest', 'Values': ['{digest}']}}])['Images']))"
    ));
    serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().clone()
}

fn kiln_tags(image: &serde_json::Value) -> Vec<(String, String)> {
    let mut tags: Vec<(String, String)> = image["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["Key"].as_str().unwrap().to_string(), t["Value"].as_str().unwrap().to_string()))
        .filter(|(k, _)| k.starts_with("kiln:"))
        .collect();
    tags.sort();
    tags
}

fn snapshot_of(image: &serde_json::Value) -> String {
    image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"].as_str().unwrap().to_string()
}

/// The launch permissions of an AMI: (UserId or Group) entries.
fn launch_permissions(moto: &Moto, region: &str, ami: &str) -> serde_json::Value {
    let out = moto.boto3(&format!(
        "print(json.dumps(client('ec2', '{region}').describe_image_attribute(ImageId='{ami}', \
         Attribute='launchPermission')['LaunchPermissions']))"
    ));
    serde_json::from_str(&out).unwrap()
}

fn lists_only_the_account(permissions: &serde_json::Value) -> bool {
    let entries = permissions.as_array().unwrap();
    entries.iter().any(|p| p["UserId"] == OTHER_ACCOUNT) && !entries.iter().any(|p| p.get("Group").is_some())
}

/// Bakes, then promotes to prod with its second region and account; returns the digest, the home AMI
/// and the copy in the other region.
fn distributed_to_prod(moto: &Moto, repo: &Repo) -> (String, String, String) {
    let digest = bake(moto, repo, &[])["digest"].as_str().unwrap().to_string();
    let home = amis_with_digest(moto, "us-east-1", &digest);
    assert_eq!(home.len(), 1, "{home:?}");
    moto.start_recording();
    run(moto, repo, &["promote", "--stage", "prod", "--no-deploy"]).ok();
    let ops = moto.stop_recording();
    eprintln!("B6 promote to prod with a copy and a share: {} calls: {}", ops.len(), ops.join(", "));
    assert_eq!(ops.iter().filter(|op| *op == "ec2:CopyImage").count(), 1, "{ops:?}");
    // Two regions, one account, one snapshot each: find-or-copy, tag, share, re-check, two pointers, protect.
    assert!(ops.len() <= 16, "{ops:?}");
    let copies = amis_with_digest(moto, OTHER_REGION, &digest);
    assert_eq!(copies.len(), 1, "one copy in {OTHER_REGION}: {copies:?}");
    (digest, home[0]["ImageId"].as_str().unwrap().to_string(), copies[0]["ImageId"].as_str().unwrap().to_string())
}

#[test]
fn promotion_copies_to_the_stages_regions_shares_with_its_accounts_and_records_it_once() {
    let moto = Moto::start();
    let repo = distributed_repo(&moto);
    let (digest, home_ami, copy_ami) = distributed_to_prod(&moto, &repo);

    // The copy carries the source's kiln tags, digest included, and so does its snapshot.
    let home = &amis_with_digest(&moto, "us-east-1", &digest)[0];
    let copy = &amis_with_digest(&moto, OTHER_REGION, &digest)[0];
    assert_eq!(kiln_tags(copy), kiln_tags(home), "copy {copy_ami} vs source {home_ami}");
    assert_eq!(tag(copy, "kiln:digest"), Some(digest.as_str()));
    let copy_snapshot = snapshot_of(copy);
    let snapshot_tags = moto.boto3(&format!(
        "print(json.dumps(client('ec2', '{OTHER_REGION}').describe_snapshots(SnapshotIds=['{copy_snapshot}'])\
         ['Snapshots'][0].get('Tags', [])))"
    ));
    assert!(snapshot_tags.contains(&digest), "the copy's snapshot carries the digest: {snapshot_tags}");

    // Both AMIs are shared with the account and with no one else; so are their snapshots' volumes.
    for (region, ami, image) in [("us-east-1", &home_ami, home), (OTHER_REGION, &copy_ami, copy)] {
        let permissions = launch_permissions(&moto, region, ami);
        assert!(lists_only_the_account(&permissions), "{region}/{ami}: {permissions}");
        let snapshot = snapshot_of(image);
        let volumes = moto.boto3(&format!(
            "print(json.dumps(client('ec2', '{region}').describe_snapshot_attribute(SnapshotId='{snapshot}', \
             Attribute='createVolumePermission')['CreateVolumePermissions']))"
        ));
        assert!(volumes.contains(OTHER_ACCOUNT), "{region}/{snapshot}: {volumes}");
        assert!(!volumes.contains("\"all\""), "{region}/{snapshot}: {volumes}");
    }

    // The stage pointer, in each region, names that region's AMI.
    for (region, ami) in [("us-east-1", &home_ami), (OTHER_REGION, &copy_ami)] {
        let pointer = moto.boto3(&format!(
            "c = client('ssm', '{region}')\n\
             v = c.get_parameter(Name='/kiln/app/prod')['Parameter']\n\
             d = c.describe_parameters(ParameterFilters=[{{'Key': 'Name', 'Option': 'Equals', 'Values': ['/kiln/app/prod']}}])['Parameters'][0]\n\
             print(json.dumps([v['Value'], v.get('DataType'), d.get('Description')]))"
        ));
        let pointer: serde_json::Value = serde_json::from_str(&pointer).unwrap();
        assert_eq!(pointer[0], ami.as_str(), "{region}: {pointer}");
        assert_eq!(pointer[1], "aws:ec2:image", "{region}: {pointer}");
        assert!(pointer[2].as_str().unwrap_or_default().contains(&digest), "{region}: {pointer}");
    }

    let before = events(&moto, &repo);
    assert_eq!(count_kind(&before, "distributed"), 1, "{:?}", kinds(&before));

    // Promoting again copies nothing and records no new distribution: it only re-checks and re-publishes.
    moto.start_recording();
    run(&moto, &repo, &["promote", "--stage", "prod", "--no-deploy"]).ok();
    let ops = moto.stop_recording();
    eprintln!("B6 promote to prod again, everything in place: {} calls: {}", ops.len(), ops.join(", "));
    assert!(!ops.iter().any(|op| op.starts_with("ec2:CopyImage") || op.starts_with("ec2:Modify")), "{ops:?}");
    assert_eq!(amis_with_digest(&moto, OTHER_REGION, &digest).len(), 1);
    let all_in_other_region =
        moto.boto3(&format!("print(len(client('ec2', '{OTHER_REGION}').describe_images(Owners=['self'])['Images']))"));
    assert_eq!(all_in_other_region.trim(), "1");
    let after = events(&moto, &repo);
    assert_eq!(count_kind(&after, "distributed"), 1, "{:?}", kinds(&after));
}

/// The newest event's kind and the events before it (`kiln log` lists the newest first).
fn split_newest(events: &[serde_json::Value]) -> (&[serde_json::Value], &str) {
    let (last, rest) = events.split_first().unwrap();
    (rest, last["kind"].as_str().unwrap_or_default())
}

#[test]
fn promotion_refuses_a_copy_that_was_removed_retagged_or_unshared_and_names_it_once() {
    let moto = Moto::start();
    let repo = distributed_repo(&moto);
    let (digest, _, copy) = distributed_to_prod(&moto, &repo);
    let at = format!("{OTHER_REGION}/{copy}");
    let other = format!("sha256:{}", "0".repeat(64));
    let ec2 = format!("c = client('ec2', '{OTHER_REGION}')\n");
    // (what drifted, how, how to undo it, what the content gate says)
    let cases = [
        (
            "unshared",
            format!(
                "c.modify_image_attribute(ImageId='{copy}', Attribute='launchPermission', \
                 OperationType='remove', UserIds=['{OTHER_ACCOUNT}'])"
            ),
            format!(
                "c.modify_image_attribute(ImageId='{copy}', Attribute='launchPermission', \
                 OperationType='add', UserIds=['{OTHER_ACCOUNT}'])"
            ),
            format!("{at} is no longer shared with account {OTHER_ACCOUNT}"),
        ),
        (
            "retagged",
            format!("c.create_tags(Resources=['{copy}'], Tags=[{{'Key': 'kiln:digest', 'Value': '{other}'}}])"),
            format!("c.create_tags(Resources=['{copy}'], Tags=[{{'Key': 'kiln:digest', 'Value': '{digest}'}}])"),
            format!("{at} is tagged kiln:digest={other}, not {digest}"),
        ),
        (
            "deregistered",
            format!("c.deregister_image(ImageId='{copy}')"),
            String::new(),
            format!("{at} no longer exists"),
        ),
    ];
    for (what, drift, undo, said) in cases {
        let before = events(&moto, &repo);
        moto.boto3(&format!("{ec2}{drift}"));
        let refused = run(&moto, &repo, &["promote", "--stage", "prod", "--no-deploy"]).expect(3);
        assert!(refused.stderr.contains(&said), "{what}: {}", refused.stderr);
        assert_eq!(refused.stderr.matches(&at).count(), 1, "{what}: each problem is said once: {}", refused.stderr);
        let after = events(&moto, &repo);
        let (rest, last) = split_newest(&after);
        assert_eq!((rest, last), (before.as_slice(), "refused"), "{what}: only a refusal is recorded");
        assert!(amis_with_digest(&moto, OTHER_REGION, &digest).len() <= 1, "{what}: nothing is copied again");
        if !undo.is_empty() {
            moto.boto3(&format!("{ec2}{undo}"));
            run(&moto, &repo, &["promote", "--stage", "prod", "--no-deploy"]).ok();
        }
    }
}

fn ami_of(moto: &Moto, digest: &str) -> (String, String) {
    let images = amis_with_digest(moto, "us-east-1", digest);
    assert_eq!(images.len(), 1, "{digest}: {images:?}");
    (images[0]["ImageId"].as_str().unwrap().to_string(), snapshot_of(&images[0]))
}

/// Which of `amis` and `snapshots` still exist in us-east-1, as boto3 sees them.
fn still_there(moto: &Moto, amis: &[&str], snapshots: &[&str]) -> (Vec<String>, Vec<String>) {
    let out = moto.boto3(&format!(
        "i = [x['ImageId'] for x in ec2.describe_images(Owners=['self'])['Images']]\n\
         s = [x['SnapshotId'] for x in ec2.describe_snapshots(OwnerIds=['self'])['Snapshots']]\n\
         print(json.dumps([sorted(x for x in i if x in {amis:?}), sorted(x for x in s if x in {snapshots:?})]))"
    ));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn gc_deletes_an_image_no_stage_needs_with_its_snapshots_and_keeps_prod_and_what_a_launch_template_uses() {
    let moto = Moto::start();
    let repo = prod_only_repo(&moto, "");
    let mut digests = Vec::new();
    for (n, mode) in ["released", "superseded", "templated", "newest"].into_iter().enumerate() {
        repo.write("images/files/app/config.txt", &format!("mode={mode}\n"));
        digests.push(bake(&moto, &repo, &[])["digest"].as_str().unwrap().to_string());
        if n == 0 {
            run(&moto, &repo, &["promote", "--stage", "prod", "--no-deploy"]).ok();
        }
    }
    // What prod holds, the newest bake and what a launch template names stay; the one image in between goes.
    let [released, superseded, templated, newest] = [0, 1, 2, 3].map(|n| ami_of(&moto, &digests[n]));
    moto.boto3(&format!(
        "ec2.create_launch_template(LaunchTemplateName='not-kiln', LaunchTemplateData={{'ImageId': '{}'}})",
        templated.0
    ));
    let all_amis = [&released, &superseded, &templated, &newest].map(|(ami, _)| ami.as_str());
    let all_snapshots = [&released, &superseded, &templated, &newest].map(|(_, snapshot)| snapshot.as_str());
    let everything = still_there(&moto, &all_amis, &all_snapshots);
    assert_eq!(everything.0.len(), 4, "{everything:?}");

    let plan = run(&moto, &repo, &["gc", "--dry-run", "--json"]).ok().json();
    let plan_text = plan.to_string();
    assert_eq!(plan["deleted"].as_array().map(Vec::len), Some(1), "{plan}");
    assert!(plan["deleted"].to_string().contains(&digests[1]), "{plan}");
    assert_eq!(plan["in_use"].as_array().map(Vec::len), Some(1), "{plan}");
    assert_eq!(plan["in_use"][0]["digest"], digests[2].as_str(), "{plan}");
    assert!(plan["in_use"][0]["users"].to_string().contains("launch template not-kiln version 1"), "{plan}");
    for kept in [&digests[0], &digests[3]] {
        assert!(!plan_text.contains(kept.as_str()), "{kept} is neither deleted nor in use: {plan}");
    }
    assert_eq!(still_there(&moto, &all_amis, &all_snapshots), everything, "a dry run deletes nothing");

    // A builder launched just now may be a bake in progress: gc leaves it running (moto cannot backdate a launch
    // time, so the hour-old case is a unit test of the age filter in src/provider/aws/gc.rs).
    let young_builder = moto.boto3(&format!(
        "print(ec2.run_instances(ImageId='{PRELOADED_AMI}', MinCount=1, MaxCount=1, TagSpecifications=[{{\
         'ResourceType': 'instance', 'Tags': [{{'Key': 'kiln:role', 'Value': 'builder'}}]}}])['Instances'][0]['InstanceId'])"
    ));
    let done = run(&moto, &repo, &["gc", "--json"]).ok().json();
    let running: Vec<_> = builders(&moto).into_iter().filter(|b| b.1 == "running").map(|b| b.0).collect();
    assert!(running.contains(&young_builder.trim().to_string()), "{running:?}");
    assert!(done["deleted"].to_string().contains(&digests[1]), "{done}");
    let (amis, snapshots) = still_there(&moto, &all_amis, &all_snapshots);
    let mut expected_amis = vec![released.0.clone(), templated.0.clone(), newest.0.clone()];
    expected_amis.sort();
    let mut expected_snapshots = vec![released.1.clone(), templated.1.clone(), newest.1.clone()];
    expected_snapshots.sort();
    assert_eq!(amis, expected_amis, "only {} is deregistered", superseded.0);
    assert_eq!(snapshots, expected_snapshots, "only {} is deleted", superseded.1);
    let log = events(&moto, &repo);
    assert_eq!(split_newest(&log).1, "collected", "{:?}", kinds(&log));
}
