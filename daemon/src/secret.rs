//! Secret bytes held in memory for the moment they are needed: a DEK the
//! HSM opened, the Diffie-Hellman output of an open, the HSM's shared
//! secret.

use std::ops::{Deref, DerefMut};

use zeroize::{Zeroize, Zeroizing};

/// A secret value: zeroized on drop, and never printed. Its `Debug` says
/// only that it is a secret and how long it is, so that a `{:?}` of a
/// structure that holds one (a job outcome, a release) leaks nothing.
///
/// It lives on the heap: a `Secret` is returned and moved from function to
/// function (the HSM's read, the key schedule, a job's outcome), and each
/// move of a value is a byte copy whose source nobody wipes; boxed, a move
/// copies the pointer, and the one place that holds the bytes is wiped on
/// drop. Make it empty and fill it in place ([`Secret::new`] of zeros,
/// then write through `DerefMut`): the value given to `new` is itself a
/// copy.
pub struct Secret<T: Zeroize>(Box<Zeroizing<T>>);

impl<T: Zeroize> Secret<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Secret(Box::new(Zeroizing::new(value)))
    }
}

impl<T: Zeroize> From<Zeroizing<T>> for Secret<T> {
    /// For a value that holds its bytes on the heap already (a vector):
    /// moving it into the box copies its pointer, not its bytes.
    fn from(value: Zeroizing<T>) -> Self {
        Secret(Box::new(value))
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
        write!(f, "Secret({} bytes, redacted)", (**self.0).as_ref().len())
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

    /// Moving a secret copies a pointer, never its bytes: a fixed-size
    /// secret is no larger than one.
    #[test]
    fn a_move_copies_a_pointer_not_the_bytes() {
        assert_eq!(
            std::mem::size_of::<Secret<[u8; 64]>>(),
            std::mem::size_of::<usize>()
        );
        let mut secret = Secret::new([0u8; 32]);
        secret.copy_from_slice(&[7; 32]);
        let at = std::ptr::from_ref::<[u8; 32]>(&secret);
        let moved = std::convert::identity(secret);
        assert_eq!(std::ptr::from_ref::<[u8; 32]>(&moved), at);
        assert_eq!(*moved, [7; 32]);
    }
}
