//! AMI bakes against moto with the real binary: a cold bake through a locked-down builder, a cache hit that launches
//! nothing, `--update-base`, and the bad inputs that must stop a bake before anything is launched. What kiln made is
//! checked with boto3 and with moto's request recorder, never through kiln's own code.

mod common;
mod moto;

use common::Run;
use moto::app::{app_repo, aws_repo, bake, builders, images_tagged, make_base, run, tag, BUCKET};
use moto::Moto;

#[test]
fn a_cold_bake_makes_a_tagged_ami_from_a_locked_down_builder_and_terminates_it() {
    let moto = Moto::start();
    let repo = aws_repo(&moto);
    moto.start_recording();
    let report = bake(&moto, &repo, &[]);
    let calls = moto.stop_recording_with_bodies();
    let digest = report["digest"].as_str().unwrap();
    let key =
        report["chain"][0]["recipe-key"].as_str().or(report["recipe-key"].as_str()).unwrap_or_default().to_string();

    // The image: named by recipe and key, tagged with everything that applies, its snapshots too.
    let images = images_tagged(&moto, "kiln:digest", digest);
    assert_eq!(images.as_array().unwrap().len(), 1, "one AMI carries the digest: {images}");
    let image = &images[0];
    let name = image["Name"].as_str().unwrap();
    assert!(name.starts_with("kiln-app-") && name.len() == "kiln-app-".len() + 12, "{name}");
    assert_eq!(tag(image, "kiln:pipeline"), Some("app"));
    assert_eq!(tag(image, "kiln:recipe"), Some("app"));
    assert!(tag(image, "kiln:recipe-key").is_some_and(|k| k.starts_with("sha256:") && (key.is_empty() || k == key)));
    let snapshot = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"].as_str().unwrap();
    let snapshot_tags = moto.boto3(&format!(
        "print(json.dumps(ec2.describe_snapshots(SnapshotIds=['{snapshot}'])['Snapshots'][0].get('Tags', [])))"
    ));
    assert!(snapshot_tags.contains(digest), "the snapshot carries the digest: {snapshot_tags}");
    let listed = run(&moto, &repo, &["images", "--json"]).ok().stdout;
    assert!(listed.contains(&format!("us-east-1/{}", image["ImageId"].as_str().unwrap())), "{listed}");

    // The builder: IMDSv2 only, no key pair, terminated; its volume was asked for encrypted.
    let builders = builders(&moto);
    assert_eq!(builders.len(), 1, "{builders:?}");
    let (_, state, key_name, tokens) = &builders[0];
    assert_eq!(state, "terminated");
    assert_eq!(key_name, &None, "no key pair");
    assert_eq!(tokens, "required", "IMDSv2 required");
    let run_instances = calls.iter().find(|(op, _)| op == "ec2:RunInstances").map(|(_, body)| body.clone()).unwrap();
    assert!(run_instances.contains("BlockDeviceMapping.1.Ebs.Encrypted=true"), "{run_instances}");
    assert!(!run_instances.contains("KeyName"), "{run_instances}");
    assert!(run_instances.contains("IamInstanceProfile.Name=kiln-builder"), "{run_instances}");
    // Its security group has no inbound rule.
    let ingress = moto.boto3(
        "g = ec2.describe_security_groups(Filters=[{'Name': 'group-name', 'Values': ['kiln-builder']}])['SecurityGroups']\n\
         print(json.dumps([x['IpPermissions'] for x in g]))",
    );
    assert_eq!(ingress.trim(), "[[]]", "one builder group, no inbound rule");

    // The staged files: one object, named by its content hash, which is what it holds.
    let staged = moto.boto3(&format!(
        "import hashlib\n\
         for o in s3.list_objects_v2(Bucket='{BUCKET}', Prefix='kiln/inputs/')['Contents']:\n\
         \x20   body = s3.get_object(Bucket='{BUCKET}', Key=o['Key'])['Body'].read()\n\
         \x20   print(o['Key'], hashlib.sha256(body).hexdigest())"
    ));
    let lines: Vec<&str> = staged.lines().collect();
    assert_eq!(lines.len(), 1, "{staged}");
    let (object, hash) = lines[0].split_once(' ').unwrap();
    assert_eq!(object, format!("kiln/inputs/sha256/{hash}.tar"));

    // The base resolved into kiln.lock.
    let lock = std::fs::read_to_string(repo.file("kiln.lock")).unwrap();
    assert!(
        lock.contains("recipe = \"app\"") && lock.contains("source = \"owner=self name=kiln-test-base-*\""),
        "{lock}"
    );

    // B6: the calls of a cold bake, counted by moto. Waits poll once each on moto, which is instant.
    let ops: Vec<&str> = calls.iter().map(|(op, _)| op.as_str()).collect();
    let polls = ops.iter().filter(|op| **op == "ssm:GetCommandInvocation").count()
        + ops.windows(2).filter(|w| w[0] == "ec2:CreateImage" && w[1] == "ec2:DescribeImages").count();
    eprintln!("B6 cold bake: {} calls ({} of them wait polls): {}", ops.len(), polls, ops.join(", "));
    assert!(ops.len() - polls <= 15, "a cold bake makes at most 15 calls besides polls: {ops:?}");
    assert_eq!(ops.iter().filter(|op| **op == "ec2:RunInstances").count(), 1);
    assert_eq!(ops.last(), Some(&"ec2:TerminateInstances"), "{ops:?}");
}

#[test]
fn a_cache_hit_launches_nothing_and_costs_at_most_two_calls_even_with_a_fresh_ledger() {
    let moto = Moto::start();
    let repo = aws_repo(&moto);
    let first = bake(&moto, &repo, &[]);
    let digest = first["digest"].as_str().unwrap().to_string();

    moto.start_recording();
    let again = bake(&moto, &repo, &[]);
    let ops = moto.stop_recording();
    assert_eq!(again["digest"], digest.as_str());
    assert_eq!(again["cached"], true, "{again}");
    eprintln!("B6 cache hit: {} calls: {}", ops.len(), ops.join(", "));
    assert!(ops.len() <= 2, "{ops:?}");
    assert!(!ops.iter().any(|op| op == "ec2:RunInstances"), "{ops:?}");

    // Another ledger (another team's, or a lost one): EC2 itself knows the recipe key, and kiln adopts the AMI.
    std::fs::remove_dir_all(repo.file(".kiln/ledger")).unwrap();
    moto.start_recording();
    let adopted = bake(&moto, &repo, &[]);
    let ops = moto.stop_recording();
    assert_eq!(adopted["digest"], digest.as_str(), "the same AMI, so the same digest");
    eprintln!("B6 adoption with a fresh ledger: {} calls: {}", ops.len(), ops.join(", "));
    assert!(ops.len() <= 2, "{ops:?}");
    assert_eq!(builders(&moto).len(), 1, "still only the first bake's builder");
    let log = run(&moto, &repo, &["log", "--json"]).ok().json();
    assert!(log.to_string().contains(&digest), "the adopted image is recorded: {log}");
}

#[test]
fn update_base_resolves_the_newest_base_again_and_only_then() {
    let moto = Moto::start();
    let repo = aws_repo(&moto);
    let first = bake(&moto, &repo, &[]);
    let lock = std::fs::read_to_string(repo.file("kiln.lock")).unwrap();
    let newer = make_base(&moto, "kiln-test-base-2");
    assert!(!lock.contains(&newer));

    let cached = bake(&moto, &repo, &[]);
    assert_eq!(cached["digest"], first["digest"], "the lock holds: a newer base changes nothing by itself");
    assert_eq!(std::fs::read_to_string(repo.file("kiln.lock")).unwrap(), lock);

    let updated = bake(&moto, &repo, &["--update-base"]);
    let lock = std::fs::read_to_string(repo.file("kiln.lock")).unwrap();
    assert!(lock.contains(&newer) && lock.contains("kiln-test-base-2"), "{lock}");
    assert_ne!(updated["digest"], first["digest"], "a new base is a new recipe key, so a new image");
    assert_eq!(builders(&moto).len(), 2, "the new base was baked on");
    let launched_from = moto.boto3("print(sorted(i['ImageId'] for r in ec2.describe_instances(Filters=[{'Name': 'tag:kiln:role', 'Values': ['builder']}])['Reservations'] for i in r['Instances']))");
    assert!(launched_from.contains(&newer), "{launched_from}");
}

#[test]
fn bad_inputs_stop_a_bake_before_anything_is_launched() {
    let moto = Moto::start();

    // A locked base that was deregistered since.
    let repo = aws_repo(&moto);
    bake(&moto, &repo, &[]);
    let base = moto.boto3(
        "print(ec2.describe_images(Owners=['self'], Filters=[{'Name': 'name', 'Values': ['kiln-test-base-1']}])['Images'][0]['ImageId'])",
    );
    let base = base.trim();
    moto.boto3(&format!("ec2.deregister_image(ImageId='{base}')"));
    repo.write("images/files/app/config.txt", "mode=slow\n");
    let gone = run(&moto, &repo, &["bake"]).expect(2);
    assert!(
        gone.stderr.contains(base) && gone.stderr.contains("no longer exists") && gone.stderr.contains("--update-base"),
        "{}",
        gone.stderr
    );
    assert_eq!(builders(&moto).len(), 1, "nothing launched for the failed bake");

    // A missing artifact bucket, named.
    moto.reset();
    let repo = aws_repo(&moto);
    repo.edit("pipelines/app.toml", BUCKET, "no-such-bucket");
    let missing = run(&moto, &repo, &["bake"]).expect(2);
    assert!(
        missing.stderr.contains("no-such-bucket") && missing.stderr.contains("does not exist"),
        "{}",
        missing.stderr
    );
    assert_eq!(builders(&moto).len(), 0);
    assert!(
        !repo.file(".kiln/ledger").exists()
            || run(&moto, &repo, &["log", "--json"]).json().to_string().find("baked").is_none()
    );

    // An endpoint nobody answers on: a clear runtime error.
    let repo = app_repo();
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    let out = Run::of(moto.kiln(&repo).env("AWS_ENDPOINT_URL", &closed).args(["bake"]).output().unwrap(), &["bake"]);
    let out = out.expect(1);
    assert!(out.stderr.contains("cannot reach AWS") && out.stderr.contains(&closed), "{}", out.stderr);
}
