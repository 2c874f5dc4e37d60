//! Who is acting: `KILN_ACTOR`, else the CI system's user, else the OS user. Recorded on every event.

const CI_ACTOR_VARS: &[&str] = &[
    "GITHUB_ACTOR",
    "GITLAB_USER_LOGIN",
    "BUILDKITE_BUILD_CREATOR",
    "CIRCLE_USERNAME",
    "BITBUCKET_STEP_TRIGGERER_UUID",
];

/// The longest actor name kiln records; names are shown in columns and compared by approvals gates.
pub const MAX_LEN: usize = 64;

/// An actor name that cannot be recorded: it would break `kiln log` lines or impersonate another actor.
#[derive(Debug, thiserror::Error)]
#[error("{origin}=`{}` is not a valid actor name: {reason}", value.escape_debug())]
pub struct BadActor {
    /// Where the name came from: the environment variable, or the OS user database.
    pub origin: String,
    pub value: String,
    pub reason: String,
}

/// The actor name as recorded: `written` without surrounding whitespace, or why it cannot be one.
pub fn check(written: &str) -> Result<String, String> {
    let name = written.trim();
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!("it contains the control character {}", c.escape_unicode()));
    }
    let len = name.chars().count();
    if len > MAX_LEN {
        return Err(format!("it is {len} characters long; at most {MAX_LEN} are allowed"));
    }
    Ok(name.to_string())
}

/// Who is acting, checked with [`check`]. The first source that is set and not blank decides: a bad
/// `KILN_ACTOR` is an error, never a silent fallback to another name.
pub fn current() -> Result<String, BadActor> {
    let from_env =
        |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty()).map(|v| (name.to_string(), v));
    let found = from_env("KILN_ACTOR")
        .or_else(|| CI_ACTOR_VARS.iter().find_map(|v| from_env(v)))
        .or_else(|| from_env("USER"))
        .or_else(|| from_env("LOGNAME"))
        .or_else(|| os_user().map(|name| ("the OS user name".to_string(), name)));
    let Some((origin, value)) = found else {
        // SAFETY: getuid has no preconditions and cannot fail.
        return Ok(format!("uid:{}", unsafe { libc::getuid() }));
    };
    check(&value).map_err(|reason| BadActor { origin, value, reason })
}

/// The login name of the current uid from the password database (cron jobs and containers often have no $USER).
fn os_user() -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: passwd is plain data that getpwuid_r fills; buf outlives every pointer it stores into passwd.
    unsafe {
        let mut passwd: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(libc::getuid(), &mut passwd, buf.as_mut_ptr(), buf.len(), &mut found);
        if rc != 0 || found.is_null() || passwd.pw_name.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(passwd.pw_name).to_string_lossy().into_owned();
        (!name.is_empty()).then_some(name)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn actor_names_are_trimmed_and_checked() {
        use super::check;
        assert_eq!(check("  ana ").unwrap(), "ana");
        assert_eq!(check("Ana María <ana@example.com>").unwrap(), "Ana María <ana@example.com>");
        assert_eq!(check(&"é".repeat(super::MAX_LEN)).unwrap().chars().count(), super::MAX_LEN);
        for (bad, reason) in [
            ("eve\nmallory", "control character \\u{a}"),
            ("eve\u{1b}[31m", "control character \\u{1b}"),
            ("tab\tbed", "control character \\u{9}"),
            ("del\u{7f}", "control character \\u{7f}"),
            ("   ", "it is empty"),
            (&"x".repeat(super::MAX_LEN + 1), "65 characters long; at most 64"),
        ] {
            let err = check(bad).unwrap_err();
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_os_user_is_found_for_this_uid() {
        assert!(super::os_user().is_some_and(|name| !name.is_empty()));
    }
}
