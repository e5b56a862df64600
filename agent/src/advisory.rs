//! Known root escapes of the nix-daemon, compiled in: a job's daemon is the one root process
//! a job feeds input of its own choosing, so the agent refuses to start an untrusted job's
//! daemon on a Nix release that an advisory says is affected, unless the operator acknowledged
//! that advisory by name (`[nix] acknowledged_advisories`).
//!
//! The version screened is the one the bootstrap installed: the hash-verified tarball's own
//! name (`nix-<version>-<system>/`, whose store holds `…-nix-<version>`, both checked at
//! install) as recorded in the store's receipt. No process is run to ask the binary.

/// A Nix release, `major.minor.patch` (a suffix such as `pre…` or `-flywheel` is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NixVersion(pub u32, pub u32, pub u32);

impl NixVersion {
    /// `2.34.6`, `2.8.0-flywheel`, `2.18.0pre20230101_abcdef`; None for anything else.
    pub fn parse(text: &str) -> Option<NixVersion> {
        let mut parts = text.splitn(3, '.');
        let num = |s: Option<&str>| -> Option<u32> {
            let s = s?;
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            s[..end].parse().ok()
        };
        let major = parts.next()?.parse().ok()?;
        let minor = num(parts.next())?;
        let patch = num(parts.next()).unwrap_or(0);
        Some(NixVersion(major, minor, patch))
    }
}

impl std::fmt::Display for NixVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One advisory: a release is affected when it is older than `unaffected_from` and is not at
/// or past the fixed release of its own `major.minor` series (a series with no fixed release
/// is affected whole).
#[derive(Debug)]
pub struct Advisory {
    pub id: &'static str,
    pub what: &'static str,
    pub fixed: &'static [NixVersion],
    pub unaffected_from: NixVersion,
}

impl Advisory {
    pub fn affects(&self, v: NixVersion) -> bool {
        if v >= self.unaffected_from {
            return false;
        }
        !self
            .fixed
            .iter()
            .any(|f| f.0 == v.0 && f.1 == v.1 && v.2 >= f.2)
    }

    fn fixed_list(&self) -> String {
        self.fixed
            .iter()
            .rev()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The advisories the agent knows (REFERENCE §12 has the sources).
///
/// CVE-2026-39860 is a bug in the fix for CVE-2024-27297; the releases that predate that fix
/// have the older bug instead. The table counts them as affected by both (every series below
/// 2.34 without a fixed release of its own), which refuses nothing that is safe: a release
/// without the 2024 fix is affected by CVE-2024-27297 anyway.
pub const ADVISORIES: &[Advisory] = &[
    Advisory {
        id: "CVE-2026-39860",
        what: "a fixed-output derivation's builder plants a symlink that the daemon follows as root, overwriting any host file",
        fixed: &[
            NixVersion(2, 28, 6),
            NixVersion(2, 29, 3),
            NixVersion(2, 30, 4),
            NixVersion(2, 31, 4),
            NixVersion(2, 32, 7),
            NixVersion(2, 33, 4),
            NixVersion(2, 34, 5),
        ],
        unaffected_from: NixVersion(2, 35, 0),
    },
    Advisory {
        id: "CVE-2024-27297",
        what: "a fixed-output derivation's builder keeps a descriptor to its output and changes it after its hash was checked",
        fixed: &[
            NixVersion(2, 3, 18),
            NixVersion(2, 18, 2),
            NixVersion(2, 19, 4),
            NixVersion(2, 20, 5),
        ],
        unaffected_from: NixVersion(2, 21, 0),
    },
];

/// Whether `id` names an advisory in the table.
pub fn known(id: &str) -> bool {
    ADVISORIES.iter().any(|a| a.id == id)
}

/// Why a daemon may not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("nix version {0:?} is not major.minor.patch: the agent cannot tell which advisories affect it, so it refuses to run an untrusted job's daemon on it; install the pinned release")]
    Unknown(String),
    #[error("nix {version} is affected by {id} ({what}; fixed in {fixed}): refusing to run an untrusted job's daemon on it; install a fixed release (the pin is {pin}), or acknowledge the advisory with [nix] acknowledged_advisories = [\"{id}\"]")]
    Affected {
        version: String,
        id: &'static str,
        what: &'static str,
        fixed: String,
        pin: String,
    },
}

/// Screen the Nix `version` an untrusted job's daemon would run: Err for the first affecting
/// advisory that is not acknowledged; Ok with one line per acknowledged advisory that affects
/// it (for the job's setup block and log).
pub fn screen(version: &str, acknowledged: &[String], pin: &str) -> Result<Vec<String>, Refusal> {
    let v = NixVersion::parse(version).ok_or_else(|| Refusal::Unknown(version.to_owned()))?;
    let mut notes = Vec::new();
    for a in ADVISORIES.iter().filter(|a| a.affects(v)) {
        if acknowledged.iter().any(|k| k == a.id) {
            notes.push(format!(
                "nix {v} runs with an acknowledged advisory: {} ({}; fixed in {})",
                a.id,
                a.what,
                a.fixed_list()
            ));
        } else {
            return Err(Refusal::Affected {
                version: version.to_owned(),
                id: a.id,
                what: a.what,
                fixed: a.fixed_list(),
                pin: pin.to_owned(),
            });
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affected(v: &str) -> Vec<&'static str> {
        let v = NixVersion::parse(v).expect("version");
        ADVISORIES
            .iter()
            .filter(|a| a.affects(v))
            .map(|a| a.id)
            .collect()
    }

    #[test]
    fn versions_parse_with_and_without_suffixes() {
        assert_eq!(NixVersion::parse("2.34.6"), Some(NixVersion(2, 34, 6)));
        assert_eq!(
            NixVersion::parse("2.8.0-flywheel"),
            Some(NixVersion(2, 8, 0))
        );
        assert_eq!(
            NixVersion::parse("2.18.0pre20230101_abc"),
            Some(NixVersion(2, 18, 0))
        );
        assert_eq!(NixVersion::parse("2.3"), Some(NixVersion(2, 3, 0)));
        assert_eq!(NixVersion::parse("nix"), None);
        assert_eq!(NixVersion::parse(""), None);
    }

    #[test]
    fn the_table_matches_the_advisories_fixed_releases() {
        // The pin and every fixed release are clean of CVE-2026-39860; their predecessors not.
        assert!(affected("2.34.6").is_empty());
        assert!(affected("2.34.5").is_empty());
        assert!(affected("2.35.0").is_empty());
        assert_eq!(affected("2.34.0"), ["CVE-2026-39860"]);
        assert_eq!(affected("2.34.4"), ["CVE-2026-39860"]);
        for (bad, good) in [
            ("2.33.3", "2.33.4"),
            ("2.32.6", "2.32.7"),
            ("2.31.3", "2.31.4"),
            ("2.30.3", "2.30.4"),
            ("2.29.2", "2.29.3"),
            ("2.28.5", "2.28.6"),
        ] {
            assert_eq!(affected(bad), ["CVE-2026-39860"], "{bad}");
            assert!(affected(good).is_empty(), "{good}");
        }
        // A series without a fixed release is affected whole.
        assert_eq!(affected("2.27.9"), ["CVE-2026-39860"]);
        // Debian's nix-bin 2.8.0 predates both fixes.
        assert_eq!(affected("2.8.0"), ["CVE-2026-39860", "CVE-2024-27297"]);
        for (bad, good) in [
            ("2.3.17", "2.3.18"),
            ("2.18.1", "2.18.2"),
            ("2.19.3", "2.19.4"),
            ("2.20.4", "2.20.5"),
        ] {
            assert!(affected(bad).contains(&"CVE-2024-27297"), "{bad}");
            assert!(!affected(good).contains(&"CVE-2024-27297"), "{good}");
        }
        assert!(!affected("2.21.0").contains(&"CVE-2024-27297"));
    }

    #[test]
    fn the_pin_is_not_affected() {
        let pin = crate::nixboot::pin().expect("pin");
        assert_eq!(screen(&pin.version, &[], &pin.version), Ok(Vec::new()));
    }

    #[test]
    fn an_affected_version_is_refused_naming_the_advisory_unless_acknowledged() {
        let e = screen("2.34.0", &[], "2.34.6").expect_err("refused");
        let text = e.to_string();
        assert!(
            text.starts_with("nix 2.34.0 is affected by CVE-2026-39860"),
            "{text}"
        );
        assert!(text.contains("fixed in 2.34.5, 2.33.4, 2.32.7"), "{text}");
        assert!(text.contains("acknowledged_advisories = [\"CVE-2026-39860\"]"));
        let notes = screen("2.34.0", &["CVE-2026-39860".into()], "2.34.6").expect("ok");
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("acknowledged advisory: CVE-2026-39860"));
        // Acknowledging one of two is not enough.
        let e = screen("2.8.0", &["CVE-2026-39860".into()], "2.34.6").expect_err("refused");
        assert!(e.to_string().contains("CVE-2024-27297"), "{e}");
        let both = ["CVE-2026-39860".to_owned(), "CVE-2024-27297".to_owned()];
        assert_eq!(
            screen("2.8.0-flywheel", &both, "2.34.6").expect("ok").len(),
            2
        );
        assert!(matches!(
            screen("unknown", &both, "2.34.6"),
            Err(Refusal::Unknown(_))
        ));
    }
}
