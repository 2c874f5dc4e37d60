//! B1 and B2: a recipe that copies a tree of 10,000 files / 200 MB.
//! - B2: a cold local bake, against a deterministic GNU tar piped into sha256sum over the same tree;
//! - B1: a bake cache hit (nothing changed), against the same pipeline: target ≤ 50 ms and ≤ 1/20 of it.
//!
//! Run: `cargo bench --bench bake` (KILN_BENCH_FILES / KILN_BENCH_MB for other sizes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Deterministic pseudo-random sizes averaging `total / files`, so the tree is the same on every machine.
fn generate(tree: &Path, files: usize, total: usize) {
    let done = tree.with_extension("done");
    let marker = format!("{files} {total}");
    if std::fs::read_to_string(&done).ok().as_deref() == Some(marker.as_str()) {
        return;
    }
    let _ = std::fs::remove_dir_all(tree);
    let mut state: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let average = total / files;
    for i in 0..files {
        let dir = tree.join(format!("d{:03}", i % 100));
        std::fs::create_dir_all(&dir).unwrap();
        let size = average / 2 + (next() as usize % average);
        let mut bytes = vec![0u8; size];
        for chunk in bytes.chunks_mut(8) {
            let v = next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        std::fs::write(dir.join(format!("f{i:05}.bin")), bytes).unwrap();
    }
    std::fs::write(done, marker).unwrap();
}

fn kiln(repo: &Path, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(repo)
        .env("KILN_LOG", "error")
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "kiln {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    took
}

fn baseline(tree: &Path) -> Duration {
    let script = format!(
        "tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu -cf - -C {} . | sha256sum > /dev/null",
        tree.display()
    );
    let started = Instant::now();
    let status = Command::new("bash").args(["-c", &script]).status().unwrap();
    assert!(status.success());
    started.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("bake bench: run it with `cargo bench --bench bake`");
        return;
    }
    let files: usize = std::env::var("KILN_BENCH_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let mb: usize = std::env::var("KILN_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/kiln-bench/bake-repo");
    let tree = repo.join("images/files/tree");
    generate(&tree, files, mb * 1_000_000);
    std::fs::write(repo.join("images/big.toml"), "[[provision]]\ncopy = \"files/tree\"\nto = \"/data\"\n").unwrap();
    std::fs::create_dir_all(repo.join("pipelines")).unwrap();
    std::fs::write(
        repo.join("pipelines/big.toml"),
        "image = \"big\"\n\n[[stage]]\nname = \"dev\"\ndeploy = { port = 18999 }\n",
    )
    .unwrap();
    // Its own committed repository, as a user's would be: the dirty check then costs what it costs them.
    if !repo.join(".git").exists()
        || std::fs::read_to_string(repo.join(".git/kiln-bench")).ok().as_deref() != Some(&format!("{files} {mb}"))
    {
        let _ = std::fs::remove_dir_all(repo.join(".git"));
        std::fs::write(repo.join(".gitignore"), "/.kiln\n").unwrap();
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .args(args)
                .current_dir(&repo)
                .env("GIT_AUTHOR_NAME", "bench")
                .env("GIT_AUTHOR_EMAIL", "bench@example.com")
                .env("GIT_COMMITTER_NAME", "bench")
                .env("GIT_COMMITTER_EMAIL", "bench@example.com")
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "bench tree"]);
        std::fs::write(repo.join(".git/kiln-bench"), format!("{files} {mb}")).unwrap();
    }
    println!("B1/B2 bake benchmark: {files} files, {mb} MB");

    // Warm the page cache for both sides.
    baseline(&tree);
    let mut cold = Vec::new();
    let mut base = Vec::new();
    for _ in 0..3 {
        let _ = std::fs::remove_dir_all(repo.join(".kiln"));
        cold.push(kiln(&repo, &["bake"]));
        base.push(baseline(&tree));
    }
    let (cold, base) = (median(cold), median(base));
    println!("  B2 cold bake                 {:>8.1} ms", ms(cold));
    println!(
        "     tar | sha256sum           {:>8.1} ms   -> bake at {:.2}x the pipeline (target ≤ 1.0x)",
        ms(base),
        cold.as_secs_f64() / base.as_secs_f64()
    );

    // The first hit after a bake may re-hash files changed within a second of the stat cache (racy mtimes).
    std::thread::sleep(Duration::from_millis(1100));
    kiln(&repo, &["bake"]);
    let hit = median((0..15).map(|_| kiln(&repo, &["bake"])).collect());
    println!(
        "  B1 cache hit                 {:>8.1} ms   (target ≤ 50 ms; 1/{:.0} of tar | sha256sum, target ≥ 1/20)",
        ms(hit),
        base.as_secs_f64() / hit.as_secs_f64()
    );
}
