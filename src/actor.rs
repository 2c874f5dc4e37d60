//! Who is acting: `KILN_ACTOR`, else the CI system's user, else the OS user. Recorded on every event.

const CI_ACTOR_VARS: &[&str] = &[
    "GITHUB_ACTOR",
    "GITLAB_USER_LOGIN",
    "BUILDKITE_BUILD_CREATOR",
    "CIRCLE_USERNAME",
    "BITBUCKET_STEP_TRIGGERER_UUID",
];

pub fn current() -> String {
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if let Some(actor) = from_env("KILN_ACTOR") {
        return actor;
    }
    if let Some(actor) = CI_ACTOR_VARS.iter().find_map(|v| from_env(v)) {
        return actor;
    }
    from_env("USER").or_else(|| from_env("LOGNAME")).unwrap_or_else(|| {
        // SAFETY: getuid has no preconditions and cannot fail.
        format!("uid:{}", unsafe { libc::getuid() })
    })
}
