//! Secret bytes held in memory for the moment they are needed: a DEK the
//! HSM opened, the Diffie-Hellman output of an open, the HSM's shared
//! secret.

use std::ops::{Deref, DerefMut};

use zeroize::{Zeroize, Zeroizing};

/// A secret value: zeroized on drop, and never printed. Its `Debug` says
/// only that it is a secret and how long it is, so that a `{:?}` of a
/// structure that holds one (a job outcome, a release) leaks nothing.
pub struct Secret<T: Zeroize>(Zeroizing<T>);

impl<T: Zeroize> Secret<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Secret(Zeroizing::new(value))
    }
}

impl<T: Zeroize> From<Zeroizing<T>> for Secret<T> {
    fn from(value: Zeroizing<T>) -> Self {
        Secret(value)
    }
}

impl<T: Zeroize> Deref for Secret<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> DerefMut for Secret<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: Zeroize + AsRef<[u8]>> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes, redacted)", (*self.0).as_ref().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_no_byte_of_it() {
        let secret = Secret::new(vec![0xAB_u8; 32]);
        let printed = format!("{secret:?} {:?}", Some(&secret));
        assert!(!printed.to_lowercase().contains("ab"), "{printed}");
        assert!(!printed.contains("171"), "{printed}");
        assert!(printed.contains("Secret(32 bytes, redacted)"), "{printed}");
        assert_eq!(secret.len(), 32);
    }
}
