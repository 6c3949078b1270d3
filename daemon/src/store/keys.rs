//! Escrow key metadata. The private key lives in the HSM under the same `kid`;
//! this table is what lets the daemon list keys, enforce their validity and
//! retention, and remember destruction after a restart.

use rusqlite::{params, OptionalExtension as _};
use time::OffsetDateTime;

use super::{SqliteStore, StoreError};
use crate::codec::{format_time, parse_time};
use crate::jwk::P256PublicKey;

/// One escrow key's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The epoch name, e.g. `2026-12`.
    pub kid: String,
    /// The public key (providers seal to it).
    pub public: P256PublicKey,
    /// Providers may seal to it from this time.
    pub not_before: OffsetDateTime,
    /// Providers must stop sealing to it at this time.
    pub not_after: OffsetDateTime,
    /// Retention end: after this the private key is destroyed.
    pub destroy_after: OffsetDateTime,
    /// When it was generated.
    pub created_at: OffsetDateTime,
    /// When it was destroyed, if it was.
    pub destroyed_at: Option<OffsetDateTime>,
    /// Why it was destroyed (`retention` or an operator's `--reason`).
    pub destroy_reason: Option<String>,
}

/// One row of the key table: its kid (as stored, or a placeholder when
/// even that cannot be read) and the key, or why the row cannot be read.
pub type KeyRow = (String, Result<KeyRecord, StoreError>);

/// Escrow key metadata storage.
pub trait KeyStore {
    /// Records a newly generated key.
    ///
    /// # Errors
    /// [`StoreError::DuplicateKid`] if the kid was ever used.
    fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    /// All keys, destroyed ones included, ordered by kid.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] or [`StoreError::Corrupt`] (any row that
    /// cannot be read).
    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.list_keys_each()?
            .into_iter()
            .map(|(_, key)| key)
            .collect()
    }
    /// As [`KeyStore::list_keys`], each row read on its own, with its kid:
    /// a row that cannot be read (an edited or damaged store) is that row's
    /// error, so that the others can still be destroyed or published.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] when the table cannot be read at all.
    fn list_keys_each(&self) -> Result<Vec<KeyRow>, StoreError>;
    /// One key by kid.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] or [`StoreError::Corrupt`].
    fn get_key(&self, kid: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Marks a key destroyed. Final: a destroyed key is never revived.
    ///
    /// # Errors
    /// [`StoreError::UnknownKid`] if there is no such key.
    fn mark_destroyed(&self, kid: &str, at: OffsetDateTime, reason: &str)
        -> Result<(), StoreError>;
}

impl SqliteStore {
    fn key_from_row(&self, row: &rusqlite::Row<'_>) -> Result<KeyRecord, StoreError> {
        let text = |i: usize| -> Result<String, StoreError> {
            row.get::<_, String>(i).map_err(|e| self.sqlite_err(e))
        };
        let time = |i: usize| -> Result<OffsetDateTime, StoreError> {
            parse_time(&text(i)?).map_err(|_| self.corrupt(format!("escrow_keys column {i}")))
        };
        let sec1: Vec<u8> = row.get(1).map_err(|e| self.sqlite_err(e))?;
        let destroyed_at: Option<String> = row.get(6).map_err(|e| self.sqlite_err(e))?;
        Ok(KeyRecord {
            kid: text(0)?,
            public: P256PublicKey::from_sec1(&sec1)
                .map_err(|_| self.corrupt("escrow_keys.public_sec1"))?,
            not_before: time(2)?,
            not_after: time(3)?,
            destroy_after: time(4)?,
            created_at: time(5)?,
            destroyed_at: destroyed_at
                .map(|t| parse_time(&t))
                .transpose()
                .map_err(|_| self.corrupt("escrow_keys.destroyed_at"))?,
            destroy_reason: row.get(7).map_err(|e| self.sqlite_err(e))?,
        })
    }
}

impl SqliteStore {
    /// Inserts a key record inside the caller's transaction (so that its
    /// `key_generated` audit leaf commits with it).
    pub(crate) fn insert_key_in(
        &self,
        conn: &rusqlite::Connection,
        key: &KeyRecord,
    ) -> Result<(), StoreError> {
        let result = conn.execute(
            &format!("INSERT INTO escrow_keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, NULL)"),
            params![
                key.kid,
                key.public.sec1().as_slice(),
                format_time(key.not_before),
                format_time(key.not_after),
                format_time(key.destroy_after),
                format_time(key.created_at),
            ],
        );
        match result {
            Ok(_) => Ok(()),
            // The kid's key alone: another constraint (a CHECK, a trigger)
            // failing is the store's error, not a kid in use.
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.extended_code,
                    rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                        | rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                ) =>
            {
                Err(StoreError::DuplicateKid(key.kid.clone()))
            }
            Err(e) => Err(self.sqlite_err(e)),
        }
    }

    /// Marks a key destroyed inside the caller's transaction. `false` if it
    /// was already destroyed or does not exist: `destroyed_at IS NULL` keeps
    /// the first destruction record.
    pub(crate) fn mark_destroyed_in(
        &self,
        conn: &rusqlite::Connection,
        kid: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let changed = conn
            .execute(
                "UPDATE escrow_keys SET destroyed_at = ?2, destroy_reason = ?3
                 WHERE kid = ?1 AND destroyed_at IS NULL",
                params![kid, format_time(at), reason],
            )
            .map_err(|e| self.sqlite_err(e))?;
        Ok(changed == 1)
    }
}

/// The kid [`KeyStore::list_keys_each`] gives a row whose kid itself
/// cannot be read.
pub const UNREADABLE_KID: &str = "(unreadable kid)";

const KEY_COLUMNS: &str = "kid, public_sec1, not_before, not_after, destroy_after, created_at, destroyed_at, destroy_reason";

impl KeyStore for SqliteStore {
    fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        self.insert_key_in(&self.conn(), key)
    }

    fn list_keys_each(&self) -> Result<Vec<KeyRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {KEY_COLUMNS} FROM escrow_keys ORDER BY kid"
            ))
            .map_err(|e| self.sqlite_err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.sqlite_err(e))?;
        let mut keys = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.sqlite_err(e))? {
            let kid = row
                .get::<_, String>(0)
                .unwrap_or_else(|_| UNREADABLE_KID.to_string());
            keys.push((kid, self.key_from_row(row)));
        }
        Ok(keys)
    }

    fn get_key(&self, kid: &str) -> Result<Option<KeyRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM escrow_keys WHERE kid = ?1"
            ))
            .map_err(|e| self.sqlite_err(e))?;
        let row = stmt
            .query_row([kid], |row| Ok(self.key_from_row(row)))
            .optional()
            .map_err(|e| self.sqlite_err(e))?;
        row.transpose()
    }

    fn mark_destroyed(
        &self,
        kid: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> Result<(), StoreError> {
        if !self.mark_destroyed_in(&self.conn(), kid, at, reason)? && self.get_key(kid)?.is_none() {
            return Err(StoreError::UnknownKid(kid.to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwk::P256PrivateKey;

    fn record(kid: &str) -> KeyRecord {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        KeyRecord {
            kid: kid.into(),
            public: P256PrivateKey::generate().unwrap().public().clone(),
            not_before: now,
            not_after: now + time::Duration::days(30),
            destroy_after: now + time::Duration::days(365),
            created_at: now,
            destroyed_at: None,
            destroy_reason: None,
        }
    }

    #[test]
    fn keys_survive_reopen_and_kids_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lavd.db");
        let rec = record("2026-12");
        {
            let store = SqliteStore::open(&path).unwrap();
            store.insert_key(&rec).unwrap();
            assert!(matches!(
                store.insert_key(&rec),
                Err(StoreError::DuplicateKid(k)) if k == "2026-12"
            ));
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.list_keys().unwrap(), vec![rec.clone()]);
        let at = rec.created_at + time::Duration::days(1);
        store.mark_destroyed("2026-12", at, "retention").unwrap();
        // A second destruction keeps the first record.
        store
            .mark_destroyed("2026-12", at + time::Duration::days(1), "again")
            .unwrap();
        let got = store.get_key("2026-12").unwrap().unwrap();
        assert_eq!(got.destroyed_at, Some(at));
        assert_eq!(got.destroy_reason.as_deref(), Some("retention"));
        assert!(matches!(
            store.mark_destroyed("nope", at, "x"),
            Err(StoreError::UnknownKid(_))
        ));
    }
}
