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
    from_env("USER").or_else(|| from_env("LOGNAME")).or_else(os_user).unwrap_or_else(|| {
        // SAFETY: getuid has no preconditions and cannot fail.
        format!("uid:{}", unsafe { libc::getuid() })
    })
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
    fn the_os_user_is_found_for_this_uid() {
        assert!(super::os_user().is_some_and(|name| !name.is_empty()));
    }
}
