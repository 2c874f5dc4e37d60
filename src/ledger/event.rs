//! Ledger events: their types, their canonical encoding, and the hash chain that links them.

use serde::{Deserialize, Serialize};

use crate::clock::ClockRecord;
use crate::config::Instance;
use crate::digest::{canonical_json, Digest, StreamHasher};
use crate::provider::ImageCopy;

/// One appended fact. Its hash is the sha256 of its canonical JSON (without the hash itself); `prev` is the hash of
/// event `seq - 1`, or all zeros for the first event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub prev: Digest,
    pub time: String,
    pub actor: String,
    /// Present only when the event was written under a pinned clock (`KILN_NOW`); absent otherwise, so events
    /// written before this member existed keep their hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockRecord>,
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    /// When the event really happened, as best the record says: the real time for a pinned clock, else `time`.
    pub fn real_time(&self) -> &str {
        match &self.clock {
            Some(ClockRecord { pinned: true, real_time }) => real_time,
            _ => &self.time,
        }
    }
}

/// A gate's verdict and the evidence it was judged on, as recorded in `promoted` and `refused` events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GateVerdict {
    pub gate: String,
    pub passed: bool,
    pub detail: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub evidence: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EventBody {
    Baked {
        pipeline: String,
        recipe: String,
        digest: Digest,
        recipe_key: Digest,
        parent: Option<Digest>,
        provider: String,
        image_ref: String,
        commit: Option<String>,
        dirty: bool,
        /// Where the provider holds the image per region and account (AWS: AMI and snapshot ids). Absent for a
        /// provider with one store, so `baked` events written before this member existed keep their hashes.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        copies: Vec<ImageCopy>,
        /// The `[instance]` section the image's instances start with (the recipe's own, else the nearest
        /// ancestor's), so a deploy reads it here rather than from a provider label. Absent in events written
        /// before it was recorded, and for an image with nothing to start.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<Instance>,
    },
    Promoted {
        pipeline: String,
        stage: String,
        digest: Digest,
        gates: Vec<GateVerdict>,
    },
    Refused {
        pipeline: String,
        stage: String,
        digest: Digest,
        gates: Vec<GateVerdict>,
    },
    Approved {
        pipeline: String,
        stage: String,
        digest: Digest,
        note: Option<String>,
    },
    Revoked {
        digest: Digest,
        reason: String,
        /// Every image whose parent chain includes `digest`, at the time of revocation.
        descendants: Vec<Digest>,
    },
    /// `kiln gc` deleted these images from the provider; the ledger keeps their history.
    Collected {
        pipeline: String,
        digests: Vec<Digest>,
    },
    DeployStarted {
        pipeline: String,
        stage: String,
        deploy_id: String,
        digest: Digest,
        group: String,
        previous_group: Option<String>,
        lease_until: String,
        /// Who holds the lease: `host:pid:start-time`, so a crashed holder's lease can be taken over at once.
        lease_holder: String,
        rollback: Option<RollbackRecord>,
    },
    DeployStep {
        pipeline: String,
        stage: String,
        deploy_id: String,
        step: String,
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        detail: serde_json::Value,
    },
    DeployFinished {
        pipeline: String,
        stage: String,
        deploy_id: String,
        digest: Digest,
        group: String,
    },
    DeployFailed {
        pipeline: String,
        stage: String,
        deploy_id: String,
        digest: Digest,
        group: String,
        reason: String,
        log_tail: Option<String>,
    },
    /// The stage's pointer (local: the OCI ref `<pipeline>-<stage>`; AWS: the SSM parameter
    /// `/kiln/<pipeline>/<stage>`) was written to name `digest`, after a promotion or as a rollback started.
    PointerPublished {
        pipeline: String,
        stage: String,
        digest: Digest,
        /// The pointer as the provider names it.
        pointer: String,
    },
    /// Promotion made the image available where the stage needs it (AWS: CopyImage into its regions, launch
    /// permissions for its accounts) and the provider then held copies the ledger did not have yet.
    Distributed {
        pipeline: String,
        stage: String,
        digest: Digest,
        /// Every copy the image has now, the ones recorded before included: the view merges them into the image's
        /// record, so the latest `distributed` event alone says where the image is.
        copies: Vec<ImageCopy>,
    },
    /// `kiln down` stopped the stage on purpose: until its next finished deployment it is stopped, not drifted.
    Stopped {
        pipeline: String,
        stage: String,
    },
    /// `kiln drill` ran a named fault against a running stage under load and judged whether the stage held its
    /// invariant (docs/drill.md). A record of a test, not a change: the view folds nothing from it.
    Drill {
        pipeline: String,
        stage: String,
        /// The drill's kind: `kill-instance`, `kill-kiln`, `unhealthy-release`, `kill-proxy` or `failed-verify`
        /// (not named `kind`, which every event uses for its own kind).
        fault: String,
        passed: bool,
        /// Requests the drill's load sent through the stage endpoint, and how many of them failed.
        requests: u64,
        failed: u64,
        /// The most failed requests the kind allows.
        bound: u64,
        /// The stage came back to capacity on one digest, the ledger's live one.
        converged: bool,
        /// The live digest before the drill; none if the stage had none.
        digest: Option<Digest>,
        duration_ms: u64,
        /// The deployments the drill ran itself (its releases, the on-call's redeploy), which are exercises and
        /// not changes: metrics leaves them out.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        deploys: Vec<String>,
        /// What the drill did and saw, in words.
        detail: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RollbackRecord {
    pub reason: Option<String>,
    pub forced: bool,
}

impl EventBody {
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Baked { .. } => "baked",
            EventBody::Promoted { .. } => "promoted",
            EventBody::Refused { .. } => "refused",
            EventBody::Approved { .. } => "approved",
            EventBody::Revoked { .. } => "revoked",
            EventBody::Collected { .. } => "collected",
            EventBody::DeployStarted { .. } => "deploy-started",
            EventBody::DeployStep { .. } => "deploy-step",
            EventBody::DeployFinished { .. } => "deploy-finished",
            EventBody::DeployFailed { .. } => "deploy-failed",
            EventBody::Stopped { .. } => "stopped",
            EventBody::PointerPublished { .. } => "pointer-published",
            EventBody::Distributed { .. } => "distributed",
            EventBody::Drill { .. } => "drill",
        }
    }

    /// The stage an event concerns, if any.
    pub fn stage(&self) -> Option<&str> {
        match self {
            EventBody::Promoted { stage, .. }
            | EventBody::Refused { stage, .. }
            | EventBody::Approved { stage, .. }
            | EventBody::DeployStarted { stage, .. }
            | EventBody::DeployStep { stage, .. }
            | EventBody::DeployFinished { stage, .. }
            | EventBody::DeployFailed { stage, .. }
            | EventBody::Stopped { stage, .. }
            | EventBody::PointerPublished { stage, .. }
            | EventBody::Distributed { stage, .. }
            | EventBody::Drill { stage, .. } => Some(stage),
            EventBody::Baked { .. } | EventBody::Revoked { .. } | EventBody::Collected { .. } => None,
        }
    }

    /// The image digest an event concerns, if any.
    pub fn digest(&self) -> Option<&Digest> {
        match self {
            EventBody::Baked { digest, .. }
            | EventBody::Promoted { digest, .. }
            | EventBody::Refused { digest, .. }
            | EventBody::Approved { digest, .. }
            | EventBody::Revoked { digest, .. }
            | EventBody::DeployStarted { digest, .. }
            | EventBody::DeployFinished { digest, .. }
            | EventBody::DeployFailed { digest, .. }
            | EventBody::PointerPublished { digest, .. }
            | EventBody::Distributed { digest, .. } => Some(digest),
            EventBody::Drill { digest, .. } => digest.as_ref(),
            EventBody::DeployStep { .. } | EventBody::Collected { .. } | EventBody::Stopped { .. } => None,
        }
    }
}

/// An event as read back from the store, with the hash that the next event's `prev` must equal.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event: Event,
    pub hash: Digest,
}

// The stored form is the canonical JSON with `"hash":"sha256:…"` spliced in as the last member, then a newline.
// Hashing the exact stored bytes (rather than a re-encoding) means any edited byte is detected at its own seq.
const HASH_OPEN: &[u8] = b",\"hash\":\"sha256:";
const HASH_CLOSE: &[u8] = b"\"}\n";
const SUFFIX_LEN: usize = HASH_OPEN.len() + 64 + HASH_CLOSE.len();

/// Encodes an event to its stored bytes and returns them with its hash.
pub fn encode(event: &Event) -> Result<(Vec<u8>, Digest), serde_json::Error> {
    let body = canonical_json(event)?;
    let hash = Digest::of(&body);
    let mut stored = Vec::with_capacity(body.len() + SUFFIX_LEN);
    stored.extend_from_slice(&body[..body.len() - 1]);
    stored.extend_from_slice(HASH_OPEN);
    stored.extend_from_slice(hash.hex().as_bytes());
    stored.extend_from_slice(HASH_CLOSE);
    Ok((stored, hash))
}

/// Why stored bytes are not a valid event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("it does not end with its hash")]
    NoHash,
    #[error("its content does not match its recorded hash")]
    HashMismatch,
    #[error("it is not a valid event: {0}")]
    Invalid(String),
}

/// Checks stored bytes against the hash they carry; returns that hash and the bytes that were hashed' length.
pub fn check_hash(stored: &[u8]) -> Result<Digest, DecodeError> {
    if stored.len() < SUFFIX_LEN + 2 || !stored.ends_with(HASH_CLOSE) {
        return Err(DecodeError::NoHash);
    }
    let body_end = stored.len() - SUFFIX_LEN;
    if &stored[body_end..body_end + HASH_OPEN.len()] != HASH_OPEN {
        return Err(DecodeError::NoHash);
    }
    let hex_start = body_end + HASH_OPEN.len();
    let recorded = &stored[hex_start..hex_start + 64];
    if !recorded.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return Err(DecodeError::NoHash);
    }
    let mut hasher = StreamHasher::new();
    hasher.update(&stored[..body_end]);
    hasher.update(b"}");
    let actual = hasher.finish();
    if actual.hex().as_bytes() != recorded {
        return Err(DecodeError::HashMismatch);
    }
    Ok(actual)
}

/// Decodes and checks a whole event.
pub fn decode(stored: &[u8]) -> Result<StoredEvent, DecodeError> {
    let hash = check_hash(stored)?;
    let event: Event = serde_json::from_slice(stored).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    Ok(StoredEvent { event, hash })
}

/// Just the chain fields and the clock, for verifying without materialising payloads.
#[derive(Deserialize)]
pub struct ChainHeader {
    pub seq: u64,
    pub prev: Digest,
    pub time: String,
    #[serde(default)]
    pub clock: Option<ClockRecord>,
}

impl ChainHeader {
    /// As [`Event::real_time`].
    pub fn real_time(&self) -> &str {
        match &self.clock {
            Some(ClockRecord { pinned: true, real_time }) => real_time,
            _ => &self.time,
        }
    }

    pub fn pinned(&self) -> bool {
        self.clock.as_ref().is_some_and(|c| c.pinned)
    }
}

pub fn decode_header(stored: &[u8]) -> Result<(ChainHeader, Digest), DecodeError> {
    let hash = check_hash(stored)?;
    let header: ChainHeader = serde_json::from_slice(stored).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    Ok((header, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Event {
        Event {
            seq,
            prev: Digest::ZERO,
            time: "2026-11-28T00:00:00.000Z".into(),
            actor: "ci".into(),
            clock: None,
            body: EventBody::Approved {
                pipeline: "hello".into(),
                stage: "prod".into(),
                digest: Digest::of(b"image"),
                note: Some("ok".into()),
            },
        }
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let event = sample(7);
        let (stored, hash) = encode(&event).unwrap();
        assert!(stored.ends_with(b"\"}\n"));
        let back = decode(&stored).unwrap();
        assert_eq!(back.event, event);
        assert_eq!(back.hash, hash);
        assert_eq!(hash, Digest::of(&canonical_json(&event).unwrap()), "the hash covers the canonical JSON");
    }

    #[test]
    fn an_event_without_a_pinned_clock_is_encoded_as_before() {
        // The hash of this event as written before events could record a pinned clock: existing ledgers verify.
        let (stored, hash) = encode(&sample(7)).unwrap();
        assert!(!String::from_utf8_lossy(&stored).contains("clock"));
        assert_eq!(hash.hex(), "5f9c3664f937d678a902406b358033d9b8b666d573cfc716a2984bbc5ddfb56d");
        let mut pinned = sample(7);
        pinned.clock = Some(ClockRecord { pinned: true, real_time: "2026-11-29T10:00:00.000Z".into() });
        let back = decode(&encode(&pinned).unwrap().0).unwrap();
        assert_eq!(back.event.real_time(), "2026-11-29T10:00:00.000Z");
        assert_eq!(back.event, pinned);
    }

    /// A `baked` event as kiln wrote it before events recorded copies and the instance section, byte for byte.
    const OLD_BAKED: &str = concat!(
        r#"{"actor":"ci","commit":null,"digest":"sha256:"#,
        "1111111111111111111111111111111111111111111111111111111111111111",
        r#"","dirty":false,"image_ref":"app:111111111111","kind":"baked","parent":null,"pipeline":"hello","#,
        r#""prev":"sha256:0000000000000000000000000000000000000000000000000000000000000000","provider":"local","#,
        r#""recipe":"app","recipe_key":"sha256:"#,
        "2222222222222222222222222222222222222222222222222222222222222222",
        r#"","seq":1,"time":"2026-11-28T00:00:00.000Z"}"#
    );

    #[test]
    fn a_baked_event_written_before_copies_and_instance_keeps_its_hash() {
        let old_hash = Digest::of(OLD_BAKED.as_bytes());
        let mut stored = OLD_BAKED.as_bytes()[..OLD_BAKED.len() - 1].to_vec();
        stored.extend_from_slice(format!(",\"hash\":\"sha256:{}\"}}\n", old_hash.hex()).as_bytes());
        let back = decode(&stored).unwrap();
        let EventBody::Baked { copies, instance, .. } = &back.event.body else { panic!("{:?}", back.event.body) };
        assert!(copies.is_empty() && instance.is_none());
        let (again, hash) = encode(&back.event).unwrap();
        assert_eq!(hash, old_hash, "re-encoding an old event must not change its hash");
        assert_eq!(String::from_utf8(again).unwrap(), String::from_utf8(stored).unwrap());
    }

    #[test]
    fn a_baked_event_records_its_copies_and_instance_section() {
        let mut event = sample(2);
        event.body = EventBody::Baked {
            pipeline: "hello".into(),
            recipe: "app".into(),
            digest: Digest::of(b"image"),
            recipe_key: Digest::of(b"key"),
            parent: None,
            provider: "aws".into(),
            image_ref: "ami-0123".into(),
            commit: None,
            dirty: false,
            copies: vec![ImageCopy {
                region: "eu-west-1".into(),
                account: Some("111122223333".into()),
                id: "ami-0456".into(),
                snapshots: vec!["snap-1".into()],
            }],
            instance: Some(crate::provider::memory::test_instance()),
        };
        let (stored, _) = encode(&event).unwrap();
        let text = String::from_utf8_lossy(&stored);
        assert!(
            text.contains(r#""copies":[{"account":"111122223333","id":"ami-0456","region":"eu-west-1","#),
            "{text}"
        );
        assert!(text.contains(r#""instance":{"command":["/bin/app"]"#), "{text}");
        assert_eq!(decode(&stored).unwrap().event, event);
    }

    #[test]
    fn a_pointer_published_event_names_its_stage_and_digest() {
        let body = EventBody::PointerPublished {
            pipeline: "hello".into(),
            stage: "prod".into(),
            digest: Digest::of(b"image"),
            pointer: "hello-prod".into(),
        };
        assert_eq!(body.kind(), "pointer-published");
        assert_eq!(body.stage(), Some("prod"));
        assert_eq!(body.digest(), Some(&Digest::of(b"image")));
        let mut event = sample(3);
        event.body = body;
        let (stored, _) = encode(&event).unwrap();
        assert!(String::from_utf8_lossy(&stored).contains(r#""kind":"pointer-published""#));
        assert_eq!(decode(&stored).unwrap().event, event);
    }

    #[test]
    fn a_distributed_event_names_its_stage_digest_and_copies() {
        let copy = ImageCopy { region: "eu-west-1".into(), account: None, id: "ami-0456".into(), snapshots: vec![] };
        let body = EventBody::Distributed {
            pipeline: "hello".into(),
            stage: "prod".into(),
            digest: Digest::of(b"image"),
            copies: vec![copy],
        };
        assert_eq!(body.kind(), "distributed");
        assert_eq!(body.stage(), Some("prod"));
        assert_eq!(body.digest(), Some(&Digest::of(b"image")));
        let mut event = sample(4);
        event.body = body;
        let (stored, _) = encode(&event).unwrap();
        let text = String::from_utf8_lossy(&stored);
        assert!(text.contains(r#""copies":[{"id":"ami-0456","region":"eu-west-1"}],"digest""#), "{text}");
        assert!(text.contains(r#""kind":"distributed""#), "{text}");
        assert_eq!(decode(&stored).unwrap().event, event);
    }

    #[test]
    fn a_drill_event_names_its_stage_digest_and_result() {
        let body = EventBody::Drill {
            pipeline: "hello".into(),
            stage: "dev".into(),
            fault: "kill-instance".into(),
            passed: true,
            requests: 120,
            failed: 0,
            bound: 0,
            converged: true,
            digest: Some(Digest::of(b"image")),
            duration_ms: 1500,
            deploys: vec![],
            detail: "SIGKILLed instance hello-dev-v001-1".into(),
        };
        assert_eq!(body.kind(), "drill");
        assert_eq!(body.stage(), Some("dev"));
        assert_eq!(body.digest(), Some(&Digest::of(b"image")));
        let mut event = sample(5);
        event.body = body;
        let (stored, _) = encode(&event).unwrap();
        let text = String::from_utf8_lossy(&stored);
        assert!(text.contains(r#""kind":"drill""#), "{text}");
        assert!(!text.contains("deploys"), "an empty list is left out: {text}");
        assert_eq!(decode(&stored).unwrap().event, event);
    }

    #[test]
    fn every_edited_byte_is_detected() {
        let (stored, _) = encode(&sample(3)).unwrap();
        for i in 0..stored.len() {
            let mut edited = stored.clone();
            edited[i] ^= 0x01;
            assert!(decode(&edited).is_err(), "flipping byte {i} went unnoticed");
        }
    }
}
