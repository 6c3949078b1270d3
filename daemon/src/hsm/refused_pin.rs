//! A record, kept across restarts, that the token refused the PIN in
//! `pin_file` (`[hsm] refused_pin_record`).
//!
//! Tokens count wrong PINs and lock the user out after a few. The shipped
//! systemd units do not restart lavd after a refusal at start (exit 77), but
//! a Kubernetes pod is restarted with backoff whatever its exit status, and
//! each start would spend one more of the token's tries. With a record, a
//! start (or a command such as `lavd keys list`, which logs in with the same
//! config) that would log in exactly as the refused one did (the same module
//! and token, and the same PIN file: path, device, inode and modification
//! time, as `fstat` saw it when the PIN was read) tries no login and exits
//! 77 at once. A change to any of these is tried once more, and a login that
//! succeeds removes the record.
//!
//! The record holds no PIN, and nothing that depends on the PIN's bytes
//! (not even the file's size, which would give its length). Anyone who can
//! write the record can stop lavd from logging in (as anyone who can write
//! the PIN file can), or make it try the PIN once more (as removing the
//! record would): it is kept beside the daemon's other writable state.
//! Before any login the record's directory must take a file, so that a
//! refusal can be recorded: a start that could not record one would be
//! tried again, and again.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::TokenSelector;

/// The first line of every record: [`VERSION`], then words for whoever
/// opens the file. Only [`VERSION`] is compared, so that the words may
/// change without making a record that stands unread.
const HEADER: &str = "lavd refused-PIN record, version 1: the token refused the PIN in the file \
                      below; lavd (its daemons, and its commands that log in) tries it no more \
                      until the file, the module or the token changes, or this record is removed";

/// What a record's first line starts with, up to and including its colon.
const VERSION: &str = "lavd refused-PIN record, version 1:";

/// What a login is tried with: the module, the token, and the PIN file as
/// `fstat` described it when the PIN was read.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginIdentity {
    pin_file: PathBuf,
    line: String,
    /// How long the part of `line` is that names the module, the token and
    /// the PIN file's path (before the file's metadata).
    source: usize,
}

impl LoginIdentity {
    /// The identity of a login with `module`, on `token`, with the PIN read
    /// from `pin_file`, whose metadata (`meta`) was taken from the handle
    /// the PIN was read through.
    #[must_use]
    pub fn of(
        module: &Path,
        token: &TokenSelector,
        pin_file: &Path,
        meta: &std::fs::Metadata,
    ) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        // `{:?}`: a name with a newline in it stays on one line.
        let source = format!(
            "module={:?} token={:?} pin_file={:?}",
            module.display().to_string(),
            token.to_string(),
            pin_file.display().to_string(),
        );
        Self {
            pin_file: pin_file.to_path_buf(),
            line: format!(
                "{source} dev={} ino={} mtime={}.{:09}",
                meta.dev(),
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec(),
            ),
            source: source.len(),
        }
    }

    /// Whether `recorded` (a record's second line) names this login's
    /// module, token and PIN file path, whatever the file's metadata.
    fn same_source(&self, recorded: &str) -> bool {
        recorded
            .strip_prefix(&self.line[..self.source])
            .is_some_and(|rest| rest.starts_with(" dev="))
    }

    /// The PIN file's path.
    #[must_use]
    pub fn pin_file(&self) -> &Path {
        &self.pin_file
    }
}

impl std::fmt::Debug for LoginIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

/// `[hsm] refused_pin_record`: where the record is kept, and the login this
/// start would try.
#[derive(Debug, Clone)]
pub struct RefusedPinRecord {
    /// The record's path.
    pub record: PathBuf,
    /// The module, the token and the PIN file, as read at this start.
    pub login: LoginIdentity,
}

/// What [`RefusedPinRecord::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No record.
    Nothing,
    /// A record of this module, token and PIN file path, whose file has
    /// changed since (or a record in another form): no refusal of this
    /// login, and removed once it succeeds.
    Other,
    /// A record of another module, token or PIN file path (another config
    /// sharing the record's path, such as a command's own): no refusal of
    /// this login, and kept when it succeeds, since it still stops the
    /// login it names.
    Foreign,
}

/// Errors of the record. Their codes: [`RefusedPinError::code`].
#[derive(Debug, thiserror::Error)]
pub enum RefusedPinError {
    /// The record names this login: the token refused this PIN at an
    /// earlier start or command, and nobody has changed the file, the
    /// module or the token since.
    #[error(
        "the token refused the PIN in {} when lavd last tried it ({ckr}), and neither the file nor \
         [hsm]'s module and token have changed since ({} records it); no login is tried, as \
         each would spend one of the token's PIN attempts: put the right PIN in the file, or, if \
         the token's security officer has since unlocked or reset the PIN to the file's, remove \
         the record (on Kubernetes: delete the pod)",
        pin_file.display(),
        record.display()
    )]
    RefusedEarlier {
        /// The PIN file.
        pin_file: PathBuf,
        /// The record.
        record: PathBuf,
        /// The `CKR_*` code of that refusal, as recorded.
        ckr: String,
    },
    /// A record exists but cannot be read (its directory's permissions), so
    /// whether this PIN was refused is unknown: no login is tried.
    #[error("cannot read the refused-PIN record {}: {error}", record.display())]
    Unreadable {
        /// The record.
        record: PathBuf,
        /// What reading it returned.
        error: std::io::Error,
    },
    /// Before any login, the record's directory did not take a file (it is
    /// missing or read-only): a refusal could not be recorded, and the next
    /// start would spend another try. No login is tried.
    #[error(
        "cannot write a file beside the refused-PIN record {}, so a refusal could not be \
         recorded: {error}; no login is tried (make its directory exist and writable)",
        record.display()
    )]
    Unwritable {
        /// The record.
        record: PathBuf,
        /// What the file system returned.
        error: std::io::Error,
    },
    /// The token refused the PIN, and writing the record failed all the
    /// same (the file system filled or failed since the check).
    #[error("cannot write the refused-PIN record {}: {error}", record.display())]
    Write {
        /// The record.
        record: PathBuf,
        /// What the file system returned.
        error: std::io::Error,
    },
    /// A login succeeded, and removing another login's record failed.
    #[error("cannot remove the refused-PIN record {}: {error}", record.display())]
    Remove {
        /// The record.
        record: PathBuf,
        /// What the file system returned.
        error: std::io::Error,
    },
}

impl RefusedPinError {
    /// The stable error code: `hsm_login_refused` (exit 77) for a refusal
    /// recorded earlier, `pin_record_unavailable` (exit 1) for the record
    /// itself failing.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::RefusedEarlier { .. } => "hsm_login_refused",
            Self::Unreadable { .. }
            | Self::Unwritable { .. }
            | Self::Write { .. }
            | Self::Remove { .. } => "pin_record_unavailable",
        }
    }
}

impl RefusedPinRecord {
    fn text(&self, ckr: &str) -> String {
        format!("{HEADER}\n{:?}\nrefused={ckr}\n", self.login)
    }

    /// This process's temporary file: a command and a start may run at the
    /// same time, and neither may remove or rename the other's.
    fn tmp(&self) -> PathBuf {
        let mut tmp = self.record.clone().into_os_string();
        tmp.push(format!(".{}.tmp", std::process::id()));
        PathBuf::from(tmp)
    }

    /// Creates the temporary file beside the record, new (never through a
    /// link, never an old one), mode 0644 whatever the umask: the record
    /// holds nothing secret, and one written by a command run as root must
    /// not become unreadable to the daemon (which would stop its every
    /// start). A temporary file of this process's id, left by a crash, is
    /// removed first (in a container, lavd often has the same id at every
    /// start).
    fn create_tmp(&self) -> std::io::Result<(PathBuf, std::fs::File)> {
        let tmp = self.tmp();
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        // `mode` is reduced by the umask (077 under some hardening).
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        Ok((tmp, file))
    }

    /// Before the first login of a start or a command.
    ///
    /// # Errors
    /// [`RefusedPinError::RefusedEarlier`] when the record names this login;
    /// [`RefusedPinError::Unreadable`] when a record exists that cannot be
    /// read; [`RefusedPinError::Unwritable`] when no file can be made beside
    /// it. A record naming another login, or in another form, is no refusal
    /// of this one: the login is tried. A refusal replaces the record; a
    /// success removes it only when it was [`Found::Other`].
    pub fn check(&self) -> Result<Found, RefusedPinError> {
        let found = match std::fs::read_to_string(&self.record) {
            Ok(text) => {
                let mut lines = text.lines();
                let header = lines.next();
                let login = lines.next();
                let ckr = lines.next().and_then(|l| l.strip_prefix("refused="));
                match (header, login, ckr) {
                    (Some(header), Some(login), Some(ckr)) if header.starts_with(VERSION) => {
                        if login == self.login.line {
                            return Err(RefusedPinError::RefusedEarlier {
                                pin_file: self.login.pin_file().to_path_buf(),
                                record: self.record.clone(),
                                ckr: ckr.to_string(),
                            });
                        }
                        if self.login.same_source(login) {
                            Found::Other
                        } else {
                            Found::Foreign
                        }
                    }
                    _ => Found::Other,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Found::Nothing,
            Err(error) => {
                return Err(RefusedPinError::Unreadable {
                    record: self.record.clone(),
                    error,
                })
            }
        };
        let unwritable = |error| RefusedPinError::Unwritable {
            record: self.record.clone(),
            error,
        };
        let (tmp, file) = self.create_tmp().map_err(unwritable)?;
        drop(file);
        std::fs::remove_file(&tmp).map_err(unwritable)?;
        Ok(found)
    }

    /// The token refused the PIN with `ckr`: records it, replacing any
    /// record (a temporary file, flushed, renamed over it, and the rename
    /// flushed, so that a crash leaves the old record or the new one, never
    /// half of one).
    ///
    /// # Errors
    /// [`RefusedPinError::Write`].
    pub fn refused(&self, ckr: &str) -> Result<(), RefusedPinError> {
        let write = |error| RefusedPinError::Write {
            record: self.record.clone(),
            error,
        };
        let (tmp, mut file) = self.create_tmp().map_err(write)?;
        let written = file
            .write_all(self.text(ckr).as_bytes())
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &self.record));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(write(e));
        }
        // The rename is durable once the directory is.
        if let Some(dir) = self.record.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(write)?;
        }
        Ok(())
    }

    /// A login succeeded after [`RefusedPinRecord::check`] found
    /// [`Found::Other`]: removes the record.
    ///
    /// # Errors
    /// [`RefusedPinError::Remove`].
    pub fn accepted(&self) -> Result<(), RefusedPinError> {
        match std::fs::remove_file(&self.record) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(RefusedPinError::Remove {
                record: self.record.clone(),
                error,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

    fn login_of(token: &str, pin: &Path) -> LoginIdentity {
        let file = std::fs::File::open(pin).expect("open the PIN file");
        LoginIdentity::of(
            Path::new(MODULE),
            &TokenSelector::Label(token.into()),
            pin,
            &file.metadata().expect("fstat"),
        )
    }

    fn record_of(dir: &Path, pin: &Path) -> RefusedPinRecord {
        RefusedPinRecord {
            record: dir.join("refused"),
            login: login_of("lavd", pin),
        }
    }

    fn refused_earlier(r: &Result<Found, RefusedPinError>) -> bool {
        matches!(r, Err(RefusedPinError::RefusedEarlier { ckr, .. }) if ckr == "CKR_PIN_INCORRECT")
    }

    #[test]
    fn a_record_refuses_only_the_login_it_names_until_that_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "wrong-pin\n").expect("write the PIN");
        let first = record_of(dir.path(), &pin);
        assert_eq!(first.check().expect("no record yet"), Found::Nothing);
        first.refused("CKR_PIN_INCORRECT").expect("record");
        // The module, the token, the file's name and metadata, and the
        // code: no field depends on the PIN's bytes.
        let text = std::fs::read_to_string(&first.record).expect("read the record");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], HEADER);
        let meta = std::fs::metadata(&pin).expect("stat");
        {
            use std::os::unix::fs::MetadataExt as _;
            assert_eq!(
                lines[1],
                format!(
                    "module={MODULE:?} token=\"label \\\"lavd\\\"\" pin_file={:?} dev={} ino={} \
                     mtime={}.{:09}",
                    pin.display().to_string(),
                    meta.dev(),
                    meta.ino(),
                    meta.mtime(),
                    meta.mtime_nsec()
                )
            );
        }
        assert_eq!(lines[2], "refused=CKR_PIN_INCORRECT");
        assert!(!first.tmp().exists(), "the temporary file stayed");
        // Readable to the daemon whoever wrote it, whatever the umask.
        {
            use std::os::unix::fs::MetadataExt as _;
            let mode = std::fs::metadata(&first.record).expect("stat").mode();
            assert_eq!(mode & 0o777, 0o644, "{mode:o}");
        }
        assert!(refused_earlier(&first.check()), "{:?}", first.check());
        // Read again, unchanged: still refused.
        assert!(refused_earlier(&record_of(dir.path(), &pin).check()));
        // Only the header's version counts: a record whose words an older
        // lavd wrote still refuses, one of another version does not.
        let reworded = text.replacen(HEADER, &format!("{VERSION} older words"), 1);
        std::fs::write(&first.record, &reworded).expect("reword the record");
        assert!(refused_earlier(&first.check()), "{:?}", first.check());
        let version_2 = text.replacen("version 1:", "version 2:", 1);
        std::fs::write(&first.record, &version_2).expect("rewrite the record");
        assert_eq!(first.check().expect("another version"), Found::Other);
        std::fs::write(&first.record, &text).expect("restore the record");

        // Another token, with the same file: tried, and the record is
        // another login's, which its success leaves in place.
        let other_token = RefusedPinRecord {
            record: first.record.clone(),
            login: login_of("other", &pin),
        };
        assert_eq!(other_token.check().expect("another token"), Found::Foreign);

        // Written in place (same inode), with a new modification time:
        // tried. (Set by hand: two writes within one clock tick of the
        // file system would share it.)
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&pin)
            .expect("open");
        let modified = file.metadata().expect("fstat").modified().expect("mtime");
        file.set_modified(modified + std::time::Duration::from_secs(1))
            .expect("set mtime");
        drop(file);
        assert_eq!(
            record_of(dir.path(), &pin)
                .check()
                .expect("changed in place"),
            Found::Other
        );

        // Replaced, even by the same bytes (a new inode): tried.
        let tmp = dir.path().join("pin.new");
        std::fs::write(&tmp, "wrong-pin\n").expect("write the PIN");
        std::fs::rename(&tmp, &pin).expect("replace the PIN file");
        let second = record_of(dir.path(), &pin);
        assert_eq!(second.check().expect("another file"), Found::Other);
        // A record in another form is no refusal either.
        std::fs::write(&second.record, "garbled").expect("garble the record");
        assert_eq!(second.check().expect("not a record"), Found::Other);
        second.accepted().expect("remove");
        assert!(!second.record.exists());
    }

    /// As a Kubernetes Secret volume holds it: `pin` links to `..data/pin`,
    /// `..data` to a directory of the payload, and an update writes a new
    /// directory and swaps the `..data` link.
    #[test]
    fn a_secret_volume_update_is_a_change() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = dir.path();
        let payload = |name: &str| {
            std::fs::create_dir(volume.join(name)).expect("payload directory");
            std::fs::write(volume.join(name).join("pin"), "wrong-pin\n").expect("PIN");
        };
        payload("..2026_12_06_08_00_00.1");
        symlink("..2026_12_06_08_00_00.1", volume.join("..data")).expect("..data");
        symlink("..data/pin", volume.join("pin")).expect("pin");
        let pin = volume.join("pin");
        let record = record_of(volume, &pin);
        record.refused("CKR_PIN_INCORRECT").expect("record");
        assert!(refused_earlier(&record_of(volume, &pin).check()));

        payload("..2026_12_06_08_05_00.2");
        symlink("..2026_12_06_08_05_00.2", volume.join("..data_tmp")).expect("..data_tmp");
        std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).expect("swap");
        assert_eq!(
            record_of(volume, &pin).check().expect("an update"),
            Found::Other
        );
    }

    #[test]
    fn a_record_that_cannot_be_read_or_written_stops_before_a_login() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "wrong-pin\n").expect("write the PIN");
        let mut record = record_of(dir.path(), &pin);
        // A directory where the record should be: reading it fails with
        // something other than "not found".
        record.record = dir.path().join("a-directory");
        std::fs::create_dir(&record.record).expect("mkdir");
        let e = record.check().expect_err("unreadable");
        assert!(matches!(e, RefusedPinError::Unreadable { .. }), "{e:?}");
        assert_eq!(e.code(), "pin_record_unavailable");
        // A directory that does not exist: nothing could be recorded.
        record.record = dir.path().join("missing").join("refused");
        let e = record.check().expect_err("unwritable");
        assert!(matches!(e, RefusedPinError::Unwritable { .. }), "{e:?}");
        assert_eq!(e.code(), "pin_record_unavailable");
        // The file system's error is in the message once, not again as a
        // cause (which `lavd: code: {e:#}` would print a second time).
        assert!(std::error::Error::source(&e).is_none());
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            shown.matches("No such file or directory").count(),
            1,
            "{shown}"
        );
        assert!(matches!(
            record.refused("CKR_PIN_INCORRECT"),
            Err(RefusedPinError::Write { .. })
        ));
    }
}
