//! A record, kept across restarts, that the token refused the PIN in
//! `pin_file` (`[hsm] refused_pin_record`).
//!
//! Tokens count wrong PINs and lock the user out after a few. The shipped
//! systemd units do not restart lavd after a refusal at start (exit 77), but
//! a Kubernetes pod is restarted with backoff whatever its exit code, and
//! each start would spend one more of the token's tries. With a record, a
//! start whose PIN file is the very file the token refused (the same path,
//! device, inode, size, modification and change times, as `fstat` saw it
//! when the PIN was read) tries no login and exits 77 at once. A file that
//! changed in any of these is tried once more, and a login that succeeds
//! removes the record.
//!
//! The record names the file and its metadata, never the PIN nor anything
//! derived from it. Anyone who can write the record can stop lavd from
//! logging in (as anyone who can write the PIN file can), or make it try
//! the PIN once more (as removing the record would): it is kept beside the
//! daemon's other writable state.

use std::path::{Path, PathBuf};

/// The first line of every record.
const HEADER: &str = "lavd refused-PIN record, version 1: the token refused the PIN in the file \
                      below; `lavd serve` tries it no more until the file changes or this record \
                      is removed";

/// Which `pin_file` the PIN was read from, as `fstat` described it then.
#[derive(Clone, PartialEq, Eq)]
pub struct PinFileIdentity {
    path: PathBuf,
    line: String,
}

impl PinFileIdentity {
    /// The identity of `path`, whose metadata (`meta`) was taken from the
    /// handle the PIN was read through, so that both describe one file.
    #[must_use]
    pub fn of(path: &Path, meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            path: path.to_path_buf(),
            // `{:?}`: a path with a newline in it stays on one line.
            line: format!(
                "pin_file={:?} dev={} ino={} size={} mtime={}.{:09} ctime={}.{:09}",
                path.display().to_string(),
                meta.dev(),
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec()
            ),
        }
    }

    /// The PIN file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::fmt::Debug for PinFileIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

/// `[hsm] refused_pin_record`: where the record is kept, and the PIN file
/// this start read.
#[derive(Debug, Clone)]
pub struct RefusedPinRecord {
    /// The record's path.
    pub record: PathBuf,
    /// The PIN file as read at this start.
    pub pin_file: PinFileIdentity,
}

/// Errors of the record.
#[derive(Debug, thiserror::Error)]
pub enum RefusedPinError {
    /// The record names the PIN file as it is now: the token refused this
    /// PIN at an earlier start, and nobody has changed the file since.
    #[error(
        "the token refused the PIN in {} at an earlier start, and the file has not changed \
         since ({} records it); no login is tried, as each would spend one of the token's PIN \
         attempts: put the right PIN in the file, or remove the record once the token's PIN \
         matches the file",
        pin_file.display(),
        record.display()
    )]
    RefusedEarlier {
        /// The PIN file.
        pin_file: PathBuf,
        /// The record.
        record: PathBuf,
    },
    /// The record exists but cannot be read (its directory's permissions),
    /// so whether this PIN was refused is unknown: no login is tried.
    #[error("cannot read the refused-PIN record {}: {source}", record.display())]
    Unreadable {
        /// The record.
        record: PathBuf,
        /// What reading it returned.
        source: std::io::Error,
    },
    /// Writing or removing the record failed (a read-only or missing
    /// directory).
    #[error("cannot {what} the refused-PIN record {}: {source}", record.display())]
    Write {
        /// "write" or "remove".
        what: &'static str,
        /// The record.
        record: PathBuf,
        /// What the file system returned.
        source: std::io::Error,
    },
}

impl RefusedPinRecord {
    fn text(&self) -> String {
        format!("{HEADER}\n{:?}\n", self.pin_file)
    }

    /// Before the first login of a start.
    ///
    /// # Errors
    /// [`RefusedPinError::RefusedEarlier`] when the record names this PIN
    /// file as it is now; [`RefusedPinError::Unreadable`] when a record
    /// exists that cannot be read. A record naming another file, or in
    /// another form, is no refusal of this one: the login is tried, and
    /// its outcome rewrites or removes the record.
    pub fn check(&self) -> Result<(), RefusedPinError> {
        match std::fs::read_to_string(&self.record) {
            Ok(text) if text == self.text() => Err(RefusedPinError::RefusedEarlier {
                pin_file: self.pin_file.path().to_path_buf(),
                record: self.record.clone(),
            }),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RefusedPinError::Unreadable {
                record: self.record.clone(),
                source,
            }),
        }
    }

    /// The token refused the PIN: records it, replacing any record (a
    /// temporary file renamed over it, so that a crash leaves the old
    /// record or the new one, never half of one).
    ///
    /// # Errors
    /// [`RefusedPinError::Write`].
    pub fn refused(&self) -> Result<(), RefusedPinError> {
        let write = |source| RefusedPinError::Write {
            what: "write",
            record: self.record.clone(),
            source,
        };
        let mut tmp = self.record.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(write)?;
            file.write_all(self.text().as_bytes()).map_err(write)?;
            file.sync_all().map_err(write)?;
        }
        std::fs::rename(&tmp, &self.record).map_err(write)
    }

    /// A login succeeded: removes the record, if any.
    ///
    /// # Errors
    /// [`RefusedPinError::Write`].
    pub fn accepted(&self) -> Result<(), RefusedPinError> {
        match std::fs::remove_file(&self.record) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RefusedPinError::Write {
                what: "remove",
                record: self.record.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_of(dir: &Path, pin: &Path) -> RefusedPinRecord {
        let file = std::fs::File::open(pin).expect("open the PIN file");
        RefusedPinRecord {
            record: dir.join("refused"),
            pin_file: PinFileIdentity::of(pin, &file.metadata().expect("fstat")),
        }
    }

    #[test]
    fn a_record_refuses_only_the_file_it_names_until_that_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234\n").expect("write the PIN");
        let first = record_of(dir.path(), &pin);
        first.check().expect("no record yet");
        first.refused().expect("record");
        // The file's name and metadata, and nothing else: no field could
        // hold the PIN or anything made from it.
        let text = std::fs::read_to_string(&first.record).expect("read the record");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0], HEADER);
        let keys: Vec<&str> = lines[1]
            .split(' ')
            .map(|field| field.split_once('=').expect("key=value").0)
            .collect();
        assert_eq!(keys, ["pin_file", "dev", "ino", "size", "mtime", "ctime"]);
        assert!(lines[1].starts_with(&format!("pin_file={:?} ", pin.display().to_string())));
        assert!(
            matches!(first.check(), Err(RefusedPinError::RefusedEarlier { .. })),
            "{:?}",
            first.check()
        );
        // Read again, unchanged: still refused.
        assert!(matches!(
            record_of(dir.path(), &pin).check(),
            Err(RefusedPinError::RefusedEarlier { .. })
        ));
        // Replaced, even by the same bytes (a new inode): tried again.
        let tmp = dir.path().join("pin.new");
        std::fs::write(&tmp, "1234\n").expect("write the PIN");
        std::fs::rename(&tmp, &pin).expect("replace the PIN file");
        let second = record_of(dir.path(), &pin);
        second.check().expect("another file");
        // A record in another form is no refusal either.
        std::fs::write(&second.record, "garbled").expect("garble the record");
        second.check().expect("not a record of this file");
        second.accepted().expect("remove");
        assert!(!second.record.exists());
        second.accepted().expect("removing no record is fine");
    }

    #[test]
    fn an_unreadable_record_is_an_error_not_a_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234\n").expect("write the PIN");
        let mut record = record_of(dir.path(), &pin);
        // A directory where the record should be: reading it fails with
        // something other than "not found".
        record.record = dir.path().join("a-directory");
        std::fs::create_dir(&record.record).expect("mkdir");
        assert!(matches!(
            record.check(),
            Err(RefusedPinError::Unreadable { .. })
        ));
    }
}
