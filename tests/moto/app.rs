//! The AWS test application: a one-recipe repository (`app` on a base this account owns, with a copy, a script
//! and a shell step; pipeline `app` with dev and prod) and the moto set-up it needs, plus boto3 views of what kiln
//! made. Shared by the AWS test binaries.

use super::super::common::{Repo, Run};
use super::Moto;

pub const BUCKET: &str = "kiln-artifacts";
/// One of the public AMIs moto preloads: the image test bases are made from.
pub const PRELOADED_AMI: &str = "ami-04681a1dbd79675a5";

pub fn run(moto: &Moto, repo: &Repo, args: &[&str]) -> Run {
    Run::of(moto.kiln(repo).args(args).output().unwrap(), args)
}

/// An AMI owned by this account, named `name`, made the way a real base would be: from an instance.
pub fn make_base(moto: &Moto, name: &str) -> String {
    moto.boto3(&format!(
        "i = ec2.run_instances(ImageId='{PRELOADED_AMI}', MinCount=1, MaxCount=1)['Instances'][0]['InstanceId']\n\
         ami = ec2.create_image(InstanceId=i, Name='{name}')['ImageId']\n\
         ec2.terminate_instances(InstanceIds=[i])\n\
         print(ami)"
    ))
    .trim()
    .to_string()
}

/// A one-recipe AWS repository: the `app` recipe on the newest base named `kiln-test-base-*` that this account
/// owns, copying a file and running a script and a shell step; pipeline `app` with dev and prod.
pub fn aws_repo(moto: &Moto) -> Repo {
    moto.boto3(&format!(
        "s3.create_bucket(Bucket='{BUCKET}')\n\
         iam.create_instance_profile(InstanceProfileName='kiln-builder')"
    ));
    make_base(moto, "kiln-test-base-1");
    app_repo()
}

/// The repository alone, for a moto [`aws_repo`] already set up.
pub fn app_repo() -> Repo {
    let repo = Repo::empty();
    repo.write(
        "images/app.toml",
        r#"description = "app"

[[provision]]
copy = "files/app"
to = "/opt/app"

[[provision]]
run = "scripts/setup.sh"

[[provision]]
shell = "echo ready > /var/lib/app-state"

[instance]
command = ["/opt/app/run"]
health = { http = "/healthz" }

[aws]
base = { owner = "self", name = "kiln-test-base-*" }
instance-type = "t3.micro"
instance-profile = "kiln-builder"
"#,
    );
    repo.write("images/files/app/run", "#!/bin/sh\nexec sleep 1000\n");
    repo.write("images/files/app/config.txt", "mode=fast\n");
    repo.write("images/scripts/setup.sh", "#!/bin/sh\nset -e\nmkdir -p /opt/app/bin\n");
    write_pipeline(
        &repo,
        r#"[[stage]]
name = "dev"
deploy = { subnets = ["subnet-00000001"] }

[[stage]]
name = "prod"
deploy = { subnets = ["subnet-00000001"] }
"#,
    );
    repo
}

/// Writes pipeline `app` (image `app` on AWS in us-east-1, files staged in [`BUCKET`]) with `stages`.
pub fn write_pipeline(repo: &Repo, stages: &str) {
    repo.write(
        "pipelines/app.toml",
        &format!("image = \"app\"\nprovider = \"aws\"\n\n[aws]\nregion = \"us-east-1\"\nartifact-bucket = \"{BUCKET}\"\n\n{stages}"),
    );
}

pub fn bake(moto: &Moto, repo: &Repo, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bake", "--json"];
    all.extend_from_slice(args);
    run(moto, repo, &all).ok().json()
}

/// Instances tagged as kiln builders: (id, state, key name, http tokens).
pub fn builders(moto: &Moto) -> Vec<(String, String, Option<String>, String)> {
    let out = moto.boto3(
        "out = []\n\
         for r in ec2.describe_instances(Filters=[{'Name': 'tag:kiln:role', 'Values': ['builder']}])['Reservations']:\n\
         \x20   for i in r['Instances']:\n\
         \x20       out.append([i['InstanceId'], i['State']['Name'], i.get('KeyName'), i['MetadataOptions']['HttpTokens']])\n\
         print(json.dumps(out))",
    );
    serde_json::from_str(&out).unwrap()
}

pub fn images_tagged(moto: &Moto, key: &str, value: &str) -> serde_json::Value {
    let out = moto.boto3(&format!(
        "print(json.dumps(ec2.describe_images(Owners=['self'], Filters=[{{'Name': 'tag:{key}', 'Values': ['{value}']}}])['Images']))"
    ));
    serde_json::from_str(&out).unwrap()
}

pub fn tag<'a>(resource: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    resource["Tags"].as_array()?.iter().find(|t| t["Key"] == key)?["Value"].as_str()
}

/// What a stage deploys into, made in moto as Terraform would: the default VPC's subnets, a security group, one
/// load balancer, and a target group (with a listener) per stage.
pub struct Network {
    pub subnets: Vec<String>,
    pub security_group: String,
    /// Target group ARN per stage, in the order asked for.
    pub target_groups: Vec<String>,
}

pub fn network(moto: &Moto, stages: &[&str]) -> Network {
    let names: Vec<String> = stages.iter().map(|s| format!("'{s}'")).collect();
    let out = moto.boto3(&format!(
        "elb = client('elbv2')\n\
         vpc = ec2.describe_vpcs(Filters=[{{'Name': 'isDefault', 'Values': ['true']}}])['Vpcs'][0]['VpcId']\n\
         subnets = [s['SubnetId'] for s in ec2.describe_subnets(Filters=[{{'Name': 'vpc-id', 'Values': [vpc]}}])['Subnets']][:2]\n\
         sg = ec2.create_security_group(GroupName='hello-instances', Description='hello', VpcId=vpc)['GroupId']\n\
         lb = elb.create_load_balancer(Name='hello', Subnets=subnets)['LoadBalancers'][0]['LoadBalancerArn']\n\
         tgs = []\n\
         for i, stage in enumerate([{}]):\n\
         \x20   tg = elb.create_target_group(Name='hello-' + stage, Protocol='HTTP', Port=8080, VpcId=vpc, TargetType='instance')['TargetGroups'][0]['TargetGroupArn']\n\
         \x20   elb.create_listener(LoadBalancerArn=lb, Protocol='HTTP', Port=8000 + i, DefaultActions=[{{'Type': 'forward', 'TargetGroupArn': tg}}])\n\
         \x20   tgs.append(tg)\n\
         print(json.dumps({{'subnets': subnets, 'sg': sg, 'tgs': tgs}}))",
        names.join(", ")
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let strings =
        |v: &serde_json::Value| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    Network {
        subnets: strings(&v["subnets"]),
        security_group: v["sg"].as_str().unwrap().to_string(),
        target_groups: strings(&v["tgs"]),
    }
}
