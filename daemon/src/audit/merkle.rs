//! RFC 6962 Merkle tree hashing, proofs from stored complete subtrees, and
//! proof verification (RFC 9162 §2.1.3.2 and §2.1.4.2).
//!
//! Hashing (RFC 6962 §2.1): a leaf hash is `SHA-256(0x00 ‖ leaf)`, an interior
//! node `SHA-256(0x01 ‖ left ‖ right)`, the empty tree `SHA-256("")`.
//!
//! Storage model: the store keeps the hash of every *complete* (perfect)
//! subtree. `(level, index)` names the subtree over the leaves
//! `[index·2^level, (index+1)·2^level)`; level 0 is the leaf hashes. A
//! complete subtree never changes once its last leaf is appended, so the
//! stored hashes are append-only, and every root, inclusion proof and
//! consistency proof for any size up to the tree size is a fold of
//! O(log n) of them: an incomplete right edge is hashed from its complete
//! pieces on the fly. [`appended_nodes`] says which new complete subtrees a
//! leaf creates, so the store inserts them in the transaction that appends
//! the leaf.
//!
//! Trust: nothing here trusts the reader. Proofs built from a corrupt store
//! are wrong proofs, and the verification functions (which need no storage)
//! refuse them against a signed root.

use std::collections::HashMap;

use aws_lc_rs::digest;

/// A SHA-256 hash: a leaf hash, an interior node or a tree root.
pub type Hash = [u8; 32];

/// A complete subtree's `(level, index)` (see [`HashReader`]).
pub type NodeId = (u8, u64);

/// The root of the empty tree, `SHA-256("")` (RFC 6962 §2.1).
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// The RFC 6962 leaf hash `SHA-256(0x00 ‖ leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    sha256(&[&[0x00], leaf])
}

/// The RFC 6962 interior node hash `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[0x01], left, right])
}

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    // SHA-256 output is always 32 bytes, so the lengths match.
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Read access to the stored hashes of complete subtrees.
///
/// `subtree(level, index)` returns the hash of the complete subtree over
/// leaves `[index·2^level, (index+1)·2^level)`. An implementation returns an
/// error for a subtree that is not stored (not yet complete, or lost).
pub trait HashReader {
    /// Why a hash could not be read (I/O, missing row, corruption).
    type Error: std::error::Error + 'static;

    /// The hash of the complete subtree `(level, index)`.
    ///
    /// # Errors
    /// The store's error, including for a subtree it does not hold.
    fn subtree(&self, level: u8, index: u64) -> Result<Hash, Self::Error>;

    /// Reads the subtrees of `wanted` that it holds, at once, for
    /// [`fetch_ahead`]. A subtree left out is read later with
    /// [`Self::subtree`], which then reports what is wrong with it. The
    /// default fetches nothing: a reader whose reads are cheap (SQLite, in
    /// memory) keeps it; one whose every read is a round trip (PostgreSQL)
    /// answers with one query.
    ///
    /// # Errors
    /// The store's error; [`fetch_ahead`] fails with it.
    fn fetch(&self, wanted: &[NodeId]) -> Result<Vec<(NodeId, Hash)>, Self::Error> {
        let _ = wanted;
        Ok(Vec::new())
    }
}

impl<R: HashReader + ?Sized> HashReader for &R {
    type Error = R::Error;

    fn subtree(&self, level: u8, index: u64) -> Result<Hash, Self::Error> {
        (**self).subtree(level, index)
    }

    fn fetch(&self, wanted: &[NodeId]) -> Result<Vec<(NodeId, Hash)>, Self::Error> {
        (**self).fetch(wanted)
    }
}

/// The reader [`fetch_ahead`] hands its computation: first it only records
/// what is asked for, then it answers from what was fetched, or from the
/// reader underneath.
pub struct Ahead<'r, R: ?Sized> {
    reader: &'r R,
    recording: bool,
    wanted: std::cell::RefCell<Vec<NodeId>>,
    fetched: HashMap<NodeId, Hash>,
}

impl<R: ?Sized> std::fmt::Debug for Ahead<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead")
            .field("recording", &self.recording)
            .field("fetched", &self.fetched.len())
            .finish_non_exhaustive()
    }
}

impl<R: HashReader + ?Sized> HashReader for Ahead<'_, R> {
    type Error = R::Error;

    fn subtree(&self, level: u8, index: u64) -> Result<Hash, Self::Error> {
        if self.recording {
            self.wanted.borrow_mut().push((level, index));
            return Ok([0; 32]);
        }
        match self.fetched.get(&(level, index)) {
            Some(hash) => Ok(*hash),
            None => self.reader.subtree(level, index),
        }
    }
}

/// Runs `compute` (a root, a proof, or several) over `reader` with every
/// subtree hash it needs read in one [`HashReader::fetch`]. Which subtrees
/// a computation here reads depends only on the sizes and indices, never on
/// the hashes' values, so a first run over a reader that records the
/// requests and answers zeros names them all; its result is dropped. The
/// second run is the real one: its result and its errors are those of
/// `compute` over `reader` alone.
///
/// # Errors
/// Those of `compute`, and the reader's own when the fetch fails (a store
/// that cannot answer one query would not answer the single reads either).
pub fn fetch_ahead<R: HashReader + ?Sized, T>(
    reader: &R,
    compute: impl Fn(&Ahead<'_, R>) -> Result<T, TreeError<R::Error>>,
) -> Result<T, TreeError<R::Error>> {
    let mut ahead = Ahead {
        reader,
        recording: true,
        wanted: std::cell::RefCell::new(Vec::new()),
        fetched: HashMap::new(),
    };
    let _ = compute(&ahead);
    ahead.recording = false;
    let mut wanted = ahead.wanted.take();
    wanted.sort_unstable();
    wanted.dedup();
    ahead.fetched = reader
        .fetch(&wanted)
        .map_err(TreeError::Reader)?
        .into_iter()
        .collect();
    compute(&ahead)
}

/// A complete subtree hash to persist: `(level, index)` covers leaves
/// `[index·2^level, (index+1)·2^level)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// Height above the leaves (0 = a leaf hash).
    pub level: u8,
    /// Position among the subtrees of this level.
    pub index: u64,
    /// The subtree's hash.
    pub hash: Hash,
}

/// A tree operation that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum TreeError<E: std::error::Error + 'static> {
    /// A leaf index at or beyond the tree size: a client asking for a proof
    /// that cannot exist.
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexOutOfRange {
        /// The requested leaf index.
        index: u64,
        /// The requested tree size.
        size: u64,
    },
    /// A consistency proof from a larger to a smaller tree: the sizes are
    /// swapped, or the client's checkpoint is newer than the requested one.
    #[error("no consistency proof from size {from} to the smaller size {to}")]
    SizesReversed {
        /// The older size.
        from: u64,
        /// The newer size.
        to: u64,
    },
    /// Appending would make the tree size overflow 64 bits.
    #[error("the tree cannot hold more than 2^64 - 1 leaves")]
    TreeFull,
    /// The hash store could not return a subtree hash: unavailable, corrupt,
    /// or asked for a size beyond the tree (the caller should refuse those
    /// first).
    #[error("reading a stored subtree hash: {0}")]
    Reader(#[source] E),
}

impl<E: std::error::Error + 'static> TreeError<E> {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::IndexOutOfRange { .. } => "index_out_of_range",
            Self::SizesReversed { .. } => "consistency_sizes_reversed",
            Self::TreeFull => "tree_full",
            Self::Reader(_) => "hash_store",
        }
    }
}

/// The complete subtrees created by appending the leaf with hash `leaf_hash`
/// at `leaf_index` (which must be the current tree size): the leaf itself at
/// level 0, then one parent per level while the new subtree is a right child.
/// Reads one stored left sibling per parent, at most 64.
///
/// The store inserts all returned nodes in the transaction that appends the
/// leaf. For several leaves in one transaction use [`appended_nodes_batch`]
/// (or make sure `reader` sees the nodes of the earlier leaves).
///
/// # Errors
/// [`TreeError::TreeFull`] for `leaf_index == u64::MAX`;
/// [`TreeError::Reader`] if a left sibling cannot be read.
pub fn appended_nodes<R: HashReader>(
    leaf_index: u64,
    leaf_hash: Hash,
    reader: &R,
) -> Result<Vec<Node>, TreeError<R::Error>> {
    if leaf_index == u64::MAX {
        return Err(TreeError::TreeFull);
    }
    let mut nodes = vec![Node {
        level: 0,
        index: leaf_index,
        hash: leaf_hash,
    }];
    let (mut level, mut index, mut hash) = (0u8, leaf_index, leaf_hash);
    // An odd index is a right child: its parent is complete now.
    while index & 1 == 1 {
        let left = reader
            .subtree(level, index - 1)
            .map_err(TreeError::Reader)?;
        hash = node_hash(&left, &hash);
        level += 1;
        index >>= 1;
        nodes.push(Node { level, index, hash });
    }
    Ok(nodes)
}

/// [`appended_nodes`] for consecutive leaves starting at `first_index`, for a
/// store that appends a batch (one unwrap request) in one transaction before
/// any of it is readable. Nodes of earlier leaves in the batch are served
/// from memory.
///
/// # Errors
/// As [`appended_nodes`].
pub fn appended_nodes_batch<R: HashReader>(
    first_index: u64,
    leaf_hashes: &[Hash],
    reader: &R,
) -> Result<Vec<Node>, TreeError<R::Error>> {
    let mut overlay = Overlay {
        base: reader,
        fresh: HashMap::new(),
    };
    let mut all = Vec::new();
    let mut index = first_index;
    for hash in leaf_hashes {
        let nodes = appended_nodes(index, *hash, &overlay)?;
        for node in &nodes {
            overlay.fresh.insert((node.level, node.index), node.hash);
        }
        all.extend(nodes);
        index = index.checked_add(1).ok_or(TreeError::TreeFull)?;
    }
    Ok(all)
}

struct Overlay<'a, R> {
    base: &'a R,
    fresh: HashMap<(u8, u64), Hash>,
}

impl<R: HashReader> HashReader for Overlay<'_, R> {
    type Error = R::Error;

    fn subtree(&self, level: u8, index: u64) -> Result<Hash, Self::Error> {
        match self.fresh.get(&(level, index)) {
            Some(hash) => Ok(*hash),
            None => self.base.subtree(level, index),
        }
    }
}

/// A reader that takes the nodes `(level, first..first + hashes.len())`
/// from `hashes`, computes every node above any of them from its children,
/// and reads the rest from `base`: a root read through it (with [`root`])
/// depends on each of `hashes`, so it equals a signed root only if they
/// are the tree's (barring a SHA-256 collision). What checks a tile
/// (C2SP tlog-tiles: the nodes of one level, or an entry bundle's level-0
/// hashes) against a signed checkpoint before it is served as immutable.
/// The nodes must be complete subtrees of the tree whose root is read.
/// With no nodes it reads every node from `base`.
#[derive(Debug)]
pub struct Through<'a, R> {
    /// Where the other nodes are read.
    pub base: &'a R,
    /// The tree level of `hashes` (0: leaf hashes).
    pub level: u8,
    /// The index, at that level, of the first of `hashes`.
    pub first: u64,
    /// The nodes taken as given.
    pub hashes: &'a [Hash],
}

impl<R: HashReader> HashReader for Through<'_, R> {
    type Error = R::Error;

    fn subtree(&self, level: u8, index: u64) -> Result<Hash, Self::Error> {
        let (first, end) = (
            u128::from(self.first),
            u128::from(self.first) + self.hashes.len() as u128,
        );
        if level == self.level && (first..end).contains(&u128::from(index)) {
            // In range: below `end`, which came from a slice's length.
            return Ok(self.hashes[usize::try_from(u128::from(index) - first).unwrap_or(0)]);
        }
        if level > self.level {
            // The nodes of `self.level` under this one.
            let shift = u32::from(level - self.level);
            let (lo, hi) = (u128::from(index) << shift, (u128::from(index) + 1) << shift);
            if lo < end && hi > first {
                let left = self.subtree(level - 1, index.wrapping_mul(2))?;
                let right = self.subtree(level - 1, index.wrapping_mul(2).wrapping_add(1))?;
                return Ok(node_hash(&left, &right));
            }
        }
        self.base.subtree(level, index)
    }
}

/// The largest power of two strictly below `n` (RFC 6962's split point `k`).
/// Only called with `n >= 2`.
fn split_point(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// `MTH(D[start : start+len])` for `len >= 1`, folded from the complete
/// subtrees ("peaks") that tile the range, largest first.
///
/// Callers only pass ranges that arise in RFC 6962's recursion from
/// `(0, size)`: `start` is then a multiple of the smallest power of two
/// `>= len`, so every peak is aligned and is a stored complete subtree.
fn range_hash<R: HashReader>(reader: &R, start: u64, len: u64) -> Result<Hash, R::Error> {
    let mut peaks = Vec::with_capacity(64);
    let (mut pos, mut remaining) = (start, len);
    while remaining > 0 {
        let level = 63 - remaining.leading_zeros();
        peaks.push(reader.subtree(level as u8, pos >> level)?);
        pos += 1u64 << level;
        remaining -= 1u64 << level;
    }
    // MTH splits at the largest power of two below the length, which is the
    // first peak; the rest recurses, so the fold runs from the right.
    let mut acc = peaks.pop().unwrap_or_else(empty_root);
    while let Some(left) = peaks.pop() {
        acc = node_hash(&left, &acc);
    }
    Ok(acc)
}

/// The tree head `MTH(D[0:size])` (RFC 6962 §2.1).
///
/// # Errors
/// [`TreeError::Reader`], including when `size` exceeds the stored tree.
pub fn root<R: HashReader>(reader: &R, size: u64) -> Result<Hash, TreeError<R::Error>> {
    if size == 0 {
        return Ok(empty_root());
    }
    range_hash(reader, 0, size).map_err(TreeError::Reader)
}

/// The audit path `PATH(index, D[0:size])` (RFC 6962 §2.1.1), leaf to root.
///
/// # Errors
/// [`TreeError::IndexOutOfRange`] when `index >= size`; [`TreeError::Reader`].
pub fn inclusion_proof<R: HashReader>(
    reader: &R,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, TreeError<R::Error>> {
    if index >= size {
        return Err(TreeError::IndexOutOfRange { index, size });
    }
    // Walk from the root down; the path is collected root-first.
    let mut path = Vec::new();
    let (mut start, mut n, mut m) = (0u64, size, index);
    while n > 1 {
        let k = split_point(n);
        if m < k {
            path.push(range_hash(reader, start + k, n - k).map_err(TreeError::Reader)?);
            n = k;
        } else {
            path.push(range_hash(reader, start, k).map_err(TreeError::Reader)?);
            start += k;
            m -= k;
            n -= k;
        }
    }
    path.reverse();
    Ok(path)
}

/// The consistency proof `PROOF(from, D[0:to])` (RFC 6962 §2.1.2). Empty when
/// `from == 0` or `from == to`.
///
/// # Errors
/// [`TreeError::SizesReversed`] when `from > to`; [`TreeError::Reader`].
pub fn consistency_proof<R: HashReader>(
    reader: &R,
    from: u64,
    to: u64,
) -> Result<Vec<Hash>, TreeError<R::Error>> {
    if from > to {
        return Err(TreeError::SizesReversed { from, to });
    }
    if from == 0 || from == to {
        return Ok(Vec::new());
    }
    // SUBPROOF(m, D[start:start+n], b), unrolled; collected root-first.
    let mut proof = Vec::new();
    let (mut start, mut n, mut m, mut whole) = (0u64, to, from, true);
    loop {
        if m == n {
            if !whole {
                proof.push(range_hash(reader, start, n).map_err(TreeError::Reader)?);
            }
            break;
        }
        let k = split_point(n);
        if m <= k {
            proof.push(range_hash(reader, start + k, n - k).map_err(TreeError::Reader)?);
            n = k;
        } else {
            proof.push(range_hash(reader, start, k).map_err(TreeError::Reader)?);
            start += k;
            m -= k;
            n -= k;
            whole = false;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// A proof that does not prove what it claims.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum ProofError {
    /// The leaf index is at or beyond the tree size.
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexOutOfRange {
        /// The claimed leaf index.
        index: u64,
        /// The claimed tree size.
        size: u64,
    },
    /// The older size is larger than the newer one.
    #[error("no consistency from size {from} to the smaller size {to}")]
    SizesReversed {
        /// The older size.
        from: u64,
        /// The newer size.
        to: u64,
    },
    /// The proof has more hashes than the tree shape allows: padding, or a
    /// proof for other sizes.
    #[error("the proof has more hashes than the tree shape allows")]
    ProofTooLong,
    /// The proof has fewer hashes than the tree shape needs: truncated, or a
    /// proof for other sizes.
    #[error("the proof has fewer hashes than the tree shape needs")]
    ProofTooShort,
    /// The inclusion proof leads to another root: the leaf is not in the tree
    /// at that index, or the proof or root was altered.
    #[error("the inclusion proof does not lead to the given root")]
    RootMismatch,
    /// The consistency proof does not rebuild the older root: the older tree
    /// is not a prefix of the newer one (a forked log) or the proof is wrong.
    #[error("the consistency proof does not rebuild the older root")]
    OldRootMismatch,
    /// The consistency proof does not rebuild the newer root.
    #[error("the consistency proof does not rebuild the newer root")]
    NewRootMismatch,
}

impl ProofError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::IndexOutOfRange { .. } => "index_out_of_range",
            Self::SizesReversed { .. } => "consistency_sizes_reversed",
            Self::ProofTooLong => "proof_too_long",
            Self::ProofTooShort => "proof_too_short",
            Self::RootMismatch => "root_mismatch",
            Self::OldRootMismatch => "old_root_mismatch",
            Self::NewRootMismatch => "new_root_mismatch",
        }
    }
}

/// Shifts `fn_` and `sn` right together until `fn_` is odd or zero
/// (RFC 9162 §2.1.3.2 step 4.b.2 and §2.1.4.2 step 6.b.2).
fn shift_while_even(fn_: &mut u64, sn: &mut u64) {
    while *fn_ & 1 == 0 && *fn_ != 0 {
        *fn_ >>= 1;
        *sn >>= 1;
    }
}

/// Verifies that `leaf_hash` is the leaf at `index` in the tree of `size`
/// leaves with head `root`, following RFC 9162 §2.1.3.2 step by step.
///
/// # Errors
/// Every [`ProofError`] except the consistency ones names why it fails.
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    // Step 1.
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    // Steps 2-3.
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf_hash;
    // Step 4.
    for p in proof {
        if sn == 0 {
            return Err(ProofError::ProofTooLong);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                shift_while_even(&mut fn_, &mut sn);
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    // Step 5.
    if sn != 0 {
        return Err(ProofError::ProofTooShort);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Verifies that the tree of `from` leaves with head `old_root` is a prefix
/// of the tree of `to` leaves with head `new_root`, following RFC 9162
/// §2.1.4.2 for `0 < from < to`.
///
/// The edge cases RFC 9162 leaves to the caller are decided strictly:
/// `from == to` needs an empty proof and equal roots; `from == 0` needs an
/// empty proof and `old_root` equal to the empty-tree hash (a size-0
/// checkpoint carries exactly that root).
///
/// # Errors
/// A [`ProofError`] naming why it fails.
pub fn verify_consistency(
    from: u64,
    to: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if from > to {
        return Err(ProofError::SizesReversed { from, to });
    }
    if from == 0 || from == to {
        if !proof.is_empty() {
            return Err(ProofError::ProofTooLong);
        }
        if from == 0 && *old_root != empty_root() {
            return Err(ProofError::OldRootMismatch);
        }
        if from == to && old_root != new_root {
            return Err(ProofError::NewRootMismatch);
        }
        return Ok(());
    }
    // Step 1.
    let Some((head, tail)) = proof.split_first() else {
        return Err(ProofError::ProofTooShort);
    };
    // Step 2: when `from` is a power of two the old root is itself a node of
    // the new tree and the proof omits it.
    let (seed, rest) = if from.is_power_of_two() {
        (*old_root, proof)
    } else {
        (*head, tail)
    };
    // Steps 3-4.
    let (mut fn_, mut sn) = (from - 1, to - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    // Step 5.
    let (mut fr, mut sr) = (seed, seed);
    // Step 6.
    for c in rest {
        if sn == 0 {
            return Err(ProofError::ProofTooLong);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                shift_while_even(&mut fn_, &mut sn);
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    // Step 7.
    if sn != 0 {
        return Err(ProofError::ProofTooShort);
    }
    if fr != *old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if sr != *new_root {
        return Err(ProofError::NewRootMismatch);
    }
    Ok(())
}

/// A subtree hash that an in-memory tree does not hold (a size beyond it).
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[error("no subtree hash at level {level}, index {index}: beyond the tree")]
pub struct MissingNode {
    /// The requested level.
    pub level: u8,
    /// The requested index.
    pub index: u64,
}

/// An in-memory tree holding every complete subtree hash, level by level.
/// Used by the offline verifier and by tests; the daemon's store is the
/// persistent [`HashReader`].
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    /// `levels[l][i]` is the hash of the complete subtree `(l, i)`.
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |leaves| leaves.len() as u64)
    }

    /// Appends a leaf (hashing it) and returns its leaf hash.
    pub fn push_leaf(&mut self, leaf: &[u8]) -> Hash {
        let hash = leaf_hash(leaf);
        self.push_leaf_hash(hash);
        hash
    }

    /// Appends a leaf given by its leaf hash.
    pub fn push_leaf_hash(&mut self, hash: Hash) {
        let mut level = 0usize;
        let mut carry = hash;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            let Some(row) = self.levels.get_mut(level) else {
                return;
            };
            row.push(carry);
            // A row of even length just completed a pair: hash it upwards.
            let len = row.len();
            if len % 2 == 1 {
                return;
            }
            match (row.get(len - 2), row.get(len - 1)) {
                (Some(left), Some(right)) => carry = node_hash(left, right),
                _ => return,
            }
            level += 1;
        }
    }

    /// The head of the first `size` leaves.
    ///
    /// # Errors
    /// [`TreeError::Reader`] when `size` exceeds the tree.
    pub fn root(&self, size: u64) -> Result<Hash, TreeError<MissingNode>> {
        root(self, size)
    }
}

impl HashReader for MemoryTree {
    type Error = MissingNode;

    fn subtree(&self, level: u8, index: u64) -> Result<Hash, MissingNode> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.levels.get(usize::from(level))?.get(i))
            .copied()
            .ok_or(MissingNode { level, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn h(hex_str: &str) -> Hash {
        hex::decode(hex_str).unwrap().try_into().unwrap()
    }

    // RFC 6962 reference tree used by the Certificate Transparency reference
    // implementations: google/certificate-transparency
    // cpp/merkletree/merkle_tree_test.cc (kInputs, kSHA256Roots, kSHA256Paths,
    // kSHA256Proofs) and transparency-dev/merkle testonly/constants.go
    // (LeafInputs, NodeHashes, RootHashes) and proof/verify_test.go
    // (inclusionProofs, consistencyProofs).
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const EMPTY_ROOT: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    /// Roots of the trees of sizes 1..=8.
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    /// Complete subtree hashes of the 8-leaf tree, by level then index
    /// (transparency-dev/merkle testonly/constants.go NodeHashes).
    const NODES: [&[&str]; 4] = [
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
            "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
        ],
        &[
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        ],
        &[
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
        &["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
    ];
    /// (0-based leaf index, tree size, path). The reference files number
    /// leaves from 1; the indices here are one less.
    const INCLUSION: [(u64, u64, &[&str]); 4] = [
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    /// (from, to, proof).
    const CONSISTENCY: [(u64, u64, &[&str]); 5] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    fn reference_tree() -> MemoryTree {
        let mut tree = MemoryTree::new();
        for leaf in LEAVES {
            tree.push_leaf(&hex::decode(leaf).unwrap());
        }
        tree
    }

    fn hashes(list: &[&str]) -> Vec<Hash> {
        list.iter().map(|s| h(s)).collect()
    }

    /// A root read through a tile's nodes ([`Through`]) is the tree's root
    /// with the tree's own nodes, full tiles and the right edge's partial
    /// ones, at several levels; and another root when any one of them is
    /// changed.
    #[test]
    fn a_root_read_through_a_tiles_nodes_depends_on_each_of_them() {
        let mut tree = MemoryTree::new();
        for i in 0..1000u32 {
            tree.push_leaf(&i.to_be_bytes());
        }
        for size in [1u64, 2, 3, 255, 256, 257, 600, 1000] {
            let want = tree.root(size).unwrap();
            for level in [0u8, 1, 3, 8] {
                let span = 1u64 << level;
                let nodes = size / span;
                // The first nodes, the last (the right edge's partial
                // tile), and a whole aligned tile of 256 past the first.
                let whole = if nodes >= 512 { (256, 256) } else { (0, 0) };
                for (first, len) in [
                    (0, nodes.min(4)),
                    (nodes.saturating_sub(3), 3.min(nodes)),
                    whole,
                ] {
                    if len == 0 {
                        continue;
                    }
                    let hashes: Vec<Hash> = (first..first + len)
                        .map(|i| tree.subtree(level, i).unwrap())
                        .collect();
                    let through = |hashes: &[Hash]| {
                        root(
                            &Through {
                                base: &tree,
                                level,
                                first,
                                hashes,
                            },
                            size,
                        )
                        .unwrap()
                    };
                    assert_eq!(through(&hashes), want, "{size} {level} {first}+{len}");
                    for k in 0..hashes.len() {
                        let mut changed = hashes.clone();
                        changed[k][0] ^= 1;
                        assert_ne!(through(&changed), want, "{size} {level} {first}+{k}");
                    }
                }
            }
        }
    }

    #[test]
    fn ct_reference_roots_and_nodes() {
        assert_eq!(empty_root(), h(EMPTY_ROOT));
        let mut tree = MemoryTree::new();
        assert_eq!(tree.root(0).unwrap(), h(EMPTY_ROOT));
        for (i, leaf) in LEAVES.iter().enumerate() {
            tree.push_leaf(&hex::decode(leaf).unwrap());
            assert_eq!(
                tree.root(i as u64 + 1).unwrap(),
                h(ROOTS[i]),
                "size {}",
                i + 1
            );
        }
        // Every prefix root is still computable from the complete subtrees of
        // the full tree.
        for (i, expected) in ROOTS.iter().enumerate() {
            assert_eq!(tree.root(i as u64 + 1).unwrap(), h(expected));
        }
        for (level, row) in NODES.iter().enumerate() {
            for (index, expected) in row.iter().enumerate() {
                assert_eq!(
                    tree.subtree(level as u8, index as u64).unwrap(),
                    h(expected),
                    "node ({level}, {index})"
                );
            }
        }
        assert_eq!(
            tree.root(9).unwrap_err().code(),
            "hash_store",
            "a size beyond the tree must not produce a root"
        );
    }

    #[test]
    fn ct_reference_inclusion_proofs() {
        let tree = reference_tree();
        for (index, size, path) in INCLUSION {
            let proof = inclusion_proof(&tree, index, size).unwrap();
            assert_eq!(proof, hashes(path), "PATH({index}, {size})");
            let leaf = leaf_hash(&hex::decode(LEAVES[index as usize]).unwrap());
            let root = h(ROOTS[size as usize - 1]);
            verify_inclusion(&leaf, index, size, &proof, &root).unwrap();
        }
        assert_eq!(inclusion_proof(&tree, 0, 1).unwrap(), Vec::<Hash>::new());
        assert_eq!(
            inclusion_proof(&tree, 8, 8).unwrap_err().code(),
            "index_out_of_range"
        );
    }

    #[test]
    fn ct_reference_consistency_proofs() {
        let tree = reference_tree();
        for (from, to, expected) in CONSISTENCY {
            let proof = consistency_proof(&tree, from, to).unwrap();
            assert_eq!(proof, hashes(expected), "PROOF({from}, {to})");
            let old = h(ROOTS[from as usize - 1]);
            let new = h(ROOTS[to as usize - 1]);
            verify_consistency(from, to, &old, &new, &proof).unwrap();
        }
        assert_eq!(
            consistency_proof(&tree, 5, 4).unwrap_err().code(),
            "consistency_sizes_reversed"
        );
    }

    /// The corruptions the reference verifiers' tests apply
    /// (proof/verify_test.go corruptInclusionProof), each with the exact
    /// refusal.
    #[test]
    fn corrupted_inclusion_proofs_are_refused() {
        let tree = reference_tree();
        let (index, size) = (5u64, 8u64);
        let proof = inclusion_proof(&tree, index, size).unwrap();
        let leaf = tree.subtree(0, index).unwrap();
        let root = tree.root(size).unwrap();
        let code = |leaf: &Hash, i: u64, s: u64, p: &[Hash], r: &Hash| {
            verify_inclusion(leaf, i, s, p, r).unwrap_err().code()
        };
        assert_eq!(code(&leaf, index - 1, size, &proof, &root), "root_mismatch");
        assert_eq!(code(&leaf, index + 1, size, &proof, &root), "root_mismatch");
        assert_eq!(code(&leaf, index ^ 2, size, &proof, &root), "root_mismatch");
        assert_eq!(
            code(&leaf, index, size * 2, &proof, &root),
            "proof_too_short"
        );
        assert_eq!(
            code(&leaf, index, size / 2, &proof, &root),
            "index_out_of_range"
        );
        assert_eq!(code(&leaf, 3, 4, &proof, &root), "proof_too_long");
        assert_eq!(code(&[7; 32], index, size, &proof, &root), "root_mismatch");
        assert_eq!(
            code(&leaf, index, size, &proof, &empty_root()),
            "root_mismatch"
        );
        let mut longer = proof.clone();
        longer.push(root);
        assert_eq!(code(&leaf, index, size, &longer, &root), "proof_too_long");
        let mut prefixed = vec![root];
        prefixed.extend_from_slice(&proof);
        assert_eq!(code(&leaf, index, size, &prefixed, &root), "proof_too_long");
        assert_eq!(
            code(&leaf, index, size, &proof[..2], &root),
            "proof_too_short"
        );
        for i in 0..proof.len() {
            let mut flipped = proof.clone();
            flipped[i][0] ^= 8;
            assert_eq!(code(&leaf, index, size, &flipped, &root), "root_mismatch");
        }
        assert_eq!(
            code(&leaf, 0, 0, &[], &empty_root()),
            "index_out_of_range",
            "nothing is included in the empty tree"
        );
    }

    #[test]
    fn corrupted_consistency_proofs_are_refused() {
        let tree = reference_tree();
        let (from, to) = (6u64, 8u64);
        let proof = consistency_proof(&tree, from, to).unwrap();
        let old = tree.root(from).unwrap();
        let new = tree.root(to).unwrap();
        let code = |f: u64, t: u64, o: &Hash, n: &Hash, p: &[Hash]| {
            verify_consistency(f, t, o, n, p).unwrap_err().code()
        };
        // Other sizes give the proof another shape: 5 and 7 leave the walk
        // one level short of the root.
        assert_eq!(code(from - 1, to, &old, &new, &proof), "proof_too_short");
        assert_eq!(code(from + 1, to, &old, &new, &proof), "proof_too_short");
        // 4 is a power of two: its root is a node of the new tree, so the
        // walk reaches the top with proof hashes left over.
        assert_eq!(code(from ^ 2, to, &old, &new, &proof), "proof_too_long");
        assert_eq!(code(from, to * 2, &old, &new, &proof), "proof_too_short");
        assert_eq!(
            code(from, to / 2, &old, &new, &proof),
            "consistency_sizes_reversed"
        );
        assert_eq!(code(from, to, &[1; 32], &new, &proof), "old_root_mismatch");
        assert_eq!(code(from, to, &old, &[1; 32], &proof), "new_root_mismatch");
        assert_eq!(code(from, to, &new, &old, &proof), "old_root_mismatch");
        assert_eq!(code(from, to, &old, &new, &[]), "proof_too_short");
        assert_eq!(code(from, to, &old, &new, &proof[..2]), "proof_too_short");
        let mut longer = proof.clone();
        longer.push(new);
        assert_eq!(code(from, to, &old, &new, &longer), "proof_too_long");
        for i in 0..proof.len() {
            let mut flipped = proof.clone();
            flipped[i][0] ^= 16;
            let got = code(from, to, &old, &new, &flipped);
            assert!(
                got == "old_root_mismatch" || got == "new_root_mismatch",
                "proof[{i}] flipped gave {got}"
            );
        }
        // The degenerate sizes, decided strictly.
        let empty = empty_root();
        verify_consistency(0, 0, &empty, &empty, &[]).unwrap();
        verify_consistency(0, 8, &empty, &new, &[]).unwrap();
        verify_consistency(8, 8, &new, &new, &[]).unwrap();
        assert_eq!(code(0, 8, &old, &new, &[]), "old_root_mismatch");
        assert_eq!(code(0, 8, &empty, &new, &[empty]), "proof_too_long");
        assert_eq!(code(8, 8, &old, &new, &[]), "new_root_mismatch");
        assert_eq!(code(8, 8, &new, &new, &[new]), "proof_too_long");
        assert_eq!(code(2, 1, &old, &new, &[]), "consistency_sizes_reversed");
    }

    /// splitmix64: a deterministic generator so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    // Brute-force RFC 6962 §2.1 definitions over a slice of leaf hashes,
    // written from the RFC text: MTH, PATH and PROOF/SUBPROOF.
    fn ref_k(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }
    fn ref_mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => empty_root(),
            1 => d[0],
            n => {
                let k = ref_k(n);
                node_hash(&ref_mth(&d[..k]), &ref_mth(&d[k..]))
            }
        }
    }
    fn ref_path(m: usize, d: &[Hash]) -> Vec<Hash> {
        let n = d.len();
        if n == 1 {
            return Vec::new();
        }
        let k = ref_k(n);
        if m < k {
            let mut p = ref_path(m, &d[..k]);
            p.push(ref_mth(&d[k..]));
            p
        } else {
            let mut p = ref_path(m - k, &d[k..]);
            p.push(ref_mth(&d[..k]));
            p
        }
    }
    fn ref_subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { Vec::new() } else { vec![ref_mth(d)] };
        }
        let k = ref_k(n);
        if m <= k {
            let mut p = ref_subproof(m, &d[..k], b);
            p.push(ref_mth(&d[k..]));
            p
        } else {
            let mut p = ref_subproof(m - k, &d[k..], false);
            p.push(ref_mth(&d[..k]));
            p
        }
    }

    fn random_tree(rng: &mut Rng, size: usize) -> (MemoryTree, Vec<Hash>) {
        let mut tree = MemoryTree::new();
        let mut leaves = Vec::with_capacity(size);
        for _ in 0..size {
            let len = rng.below(40) as usize;
            let leaf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            leaves.push(tree.push_leaf(&leaf));
        }
        (tree, leaves)
    }

    /// Every inclusion and consistency proof of every tree up to 300 leaves
    /// verifies; proofs and roots equal the brute-force RFC 6962 definitions
    /// (exhaustively up to 64 leaves, on random samples above).
    #[test]
    fn proofs_match_rfc6962_definitions_and_verify() {
        let mut rng = Rng(0x6c61_7664_6175_6474);
        let (tree, leaves) = random_tree(&mut rng, 300);
        for size in 1..=300usize {
            let d = &leaves[..size];
            let root = tree.root(size as u64).unwrap();
            assert_eq!(root, ref_mth(d), "MTH of {size}");
            let exhaustive = size <= 64;
            for m in 0..size {
                let proof = inclusion_proof(&tree, m as u64, size as u64).unwrap();
                verify_inclusion(&d[m], m as u64, size as u64, &proof, &root).unwrap();
                if exhaustive || rng.below(16) == 0 || m == 0 || m == size - 1 {
                    assert_eq!(proof, ref_path(m, d), "PATH({m}, {size})");
                }
            }
            for from in 1..=size {
                let old = tree.root(from as u64).unwrap();
                let proof = consistency_proof(&tree, from as u64, size as u64).unwrap();
                verify_consistency(from as u64, size as u64, &old, &root, &proof).unwrap();
                if exhaustive || rng.below(16) == 0 || from == 1 || from == size - 1 {
                    assert_eq!(proof, ref_subproof(from, d, true), "PROOF({from}, {size})");
                }
            }
        }
    }

    #[test]
    fn appended_nodes_are_exactly_the_new_complete_subtrees() {
        let mut rng = Rng(7);
        let (full, leaves) = random_tree(&mut rng, 130);
        let mut store: HashMap<(u8, u64), Hash> = HashMap::new();
        struct MapReader<'a>(&'a HashMap<(u8, u64), Hash>);
        impl HashReader for MapReader<'_> {
            type Error = MissingNode;
            fn subtree(&self, level: u8, index: u64) -> Result<Hash, MissingNode> {
                self.0
                    .get(&(level, index))
                    .copied()
                    .ok_or(MissingNode { level, index })
            }
        }
        for (i, leaf) in leaves.iter().enumerate() {
            let nodes = appended_nodes(i as u64, *leaf, &MapReader(&store)).unwrap();
            // Leaf i completes one subtree per trailing one bit of i, plus
            // the leaf itself.
            assert_eq!(nodes.len() as u32, (i as u64).trailing_ones() + 1);
            for n in &nodes {
                let covered_end = (n.index + 1) << n.level;
                assert_eq!(covered_end, i as u64 + 1, "node ends at the new leaf");
                assert_eq!(Some(n.hash), full.subtree(n.level, n.index).ok());
                assert!(store.insert((n.level, n.index), n.hash).is_none());
            }
        }
        // The stored set is exactly the complete subtrees of the full tree.
        let expected: usize = (0..8).map(|l| 130usize >> l).sum();
        assert_eq!(store.len(), expected);

        // A batch over an empty overlay base gives the same nodes.
        let mut prefix: HashMap<(u8, u64), Hash> = HashMap::new();
        for (k, v) in &store {
            if ((k.1 + 1) << k.0) <= 100 {
                prefix.insert(*k, *v);
            }
        }
        let batch = appended_nodes_batch(100, &leaves[100..], &MapReader(&prefix)).unwrap();
        for n in &batch {
            assert_eq!(store.get(&(n.level, n.index)), Some(&n.hash));
        }
        assert_eq!(batch.len() + prefix.len(), store.len());

        // A missing sibling is the reader's error, not a panic or a guess.
        let err = appended_nodes(101, leaves[101], &MapReader(&HashMap::new())).unwrap_err();
        assert_eq!(err.code(), "hash_store");
        assert_eq!(
            appended_nodes(u64::MAX, leaves[0], &MapReader(&store))
                .unwrap_err()
                .code(),
            "tree_full"
        );
    }

    /// Proofs read O(log n) stored hashes, whatever the shape of the right
    /// edge.
    #[test]
    fn proofs_read_logarithmically_many_hashes() {
        struct Counting<'a> {
            tree: &'a MemoryTree,
            reads: Cell<u32>,
        }
        impl HashReader for Counting<'_> {
            type Error = MissingNode;
            fn subtree(&self, level: u8, index: u64) -> Result<Hash, MissingNode> {
                self.reads.set(self.reads.get() + 1);
                self.tree.subtree(level, index)
            }
        }
        let mut rng = Rng(99);
        let (tree, _) = random_tree(&mut rng, 1000);
        let reader = Counting {
            tree: &tree,
            reads: Cell::new(0),
        };
        for size in [1u64, 2, 3, 7, 8, 9, 255, 511, 512, 513, 999, 1000] {
            let depth = 64 - (size - 1).leading_zeros();
            let bound = 2 * depth + 1;
            for index in [0, size / 3, size / 2, size - 1] {
                reader.reads.set(0);
                inclusion_proof(&reader, index, size).unwrap();
                assert!(reader.reads.get() <= bound, "inclusion {index}/{size}");
                reader.reads.set(0);
                consistency_proof(&reader, index + 1, size).unwrap();
                assert!(
                    reader.reads.get() <= bound,
                    "consistency {}/{size}",
                    index + 1
                );
            }
            reader.reads.set(0);
            root(&reader, size).unwrap();
            assert!(reader.reads.get() <= depth + 1, "root {size}");
        }
    }

    /// A store whose reads are counted and which answers `fetch` from the
    /// same tree, leaving out the subtrees in `lost`, or fails it.
    struct Fetching {
        tree: MemoryTree,
        lost: Vec<NodeId>,
        fetch_fails: bool,
        reads: Cell<u32>,
        fetches: Cell<u32>,
    }

    impl HashReader for Fetching {
        type Error = MissingNode;

        fn subtree(&self, level: u8, index: u64) -> Result<Hash, MissingNode> {
            self.reads.set(self.reads.get() + 1);
            if self.lost.contains(&(level, index)) {
                return Err(MissingNode { level, index });
            }
            self.tree.subtree(level, index)
        }

        fn fetch(&self, wanted: &[NodeId]) -> Result<Vec<(NodeId, Hash)>, MissingNode> {
            self.fetches.set(self.fetches.get() + 1);
            if self.fetch_fails {
                return Err(MissingNode {
                    level: 63,
                    index: 0,
                });
            }
            Ok(wanted
                .iter()
                .filter(|w| !self.lost.contains(w))
                .filter_map(|&(l, i)| Some(((l, i), self.tree.subtree(l, i).ok()?)))
                .collect())
        }
    }

    #[test]
    fn fetch_ahead_reads_everything_in_one_fetch_and_gives_the_same_results_and_errors() {
        let mut tree = MemoryTree::new();
        for i in 0..300u32 {
            tree.push_leaf(&i.to_be_bytes());
        }
        let reader = Fetching {
            tree: tree.clone(),
            lost: Vec::new(),
            fetch_fails: false,
            reads: Cell::new(0),
            fetches: Cell::new(0),
        };
        for (from, to) in [(0, 1), (1, 2), (7, 8), (100, 257), (255, 300), (299, 300)] {
            reader.reads.set(0);
            reader.fetches.set(0);
            let got = fetch_ahead(&reader, |r| {
                Ok((
                    root(r, to)?,
                    consistency_proof(r, from, to)?,
                    inclusion_proof(r, from, to)?,
                ))
            })
            .unwrap();
            let want = (
                root(&tree, to).unwrap(),
                consistency_proof(&tree, from, to).unwrap(),
                inclusion_proof(&tree, from, to).unwrap(),
            );
            assert_eq!(got, want, "{from} → {to}");
            assert_eq!(
                (reader.fetches.get(), reader.reads.get()),
                (1, 0),
                "{from} → {to}"
            );
        }
        // A subtree the fetch leaves out is read on its own, and its error
        // is the computation's, as without fetching ahead.
        let mut broken = Fetching {
            tree,
            lost: vec![(5, 8)],
            fetch_fails: false,
            reads: Cell::new(0),
            fetches: Cell::new(0),
        };
        let err = fetch_ahead(&broken, |r| root(r, 300)).unwrap_err();
        assert_eq!(broken.reads.get(), 1);
        assert!(
            matches!(err, TreeError::Reader(MissingNode { level: 5, index: 8 })),
            "{err:?}"
        );
        assert_eq!(
            format!(
                "{:?}",
                fetch_ahead(&broken, |r| consistency_proof(r, 5, 301))
            ),
            format!("{:?}", consistency_proof(&broken, 5, 301)),
        );
        // A fetch that fails fails the computation with its error, before
        // any single read.
        broken.fetch_fails = true;
        broken.reads.set(0);
        let err = fetch_ahead(&broken, |r| root(r, 300)).unwrap_err();
        assert!(
            matches!(
                err,
                TreeError::Reader(MissingNode {
                    level: 63,
                    index: 0
                })
            ),
            "{err:?}"
        );
        assert_eq!(broken.reads.get(), 0);
    }

    #[test]
    fn fetch_ahead_serves_a_batch_append_from_one_fetch() {
        for first in [0u32, 1, 6, 7, 255, 299] {
            for count in [1u32, 2, 100] {
                let mut tree = MemoryTree::new();
                for i in 0..first {
                    tree.push_leaf(&i.to_be_bytes());
                }
                let hashes: Vec<Hash> = (first..first + count)
                    .map(|i| leaf_hash(&i.to_be_bytes()))
                    .collect();
                let want = appended_nodes_batch(u64::from(first), &hashes, &tree).unwrap();
                let reader = Fetching {
                    tree,
                    lost: Vec::new(),
                    fetch_fails: false,
                    reads: Cell::new(0),
                    fetches: Cell::new(0),
                };
                let got = fetch_ahead(&reader, |r| {
                    appended_nodes_batch(u64::from(first), &hashes, r)
                })
                .unwrap();
                assert_eq!(got, want, "{first} + {count}");
                assert_eq!(
                    (reader.fetches.get(), reader.reads.get()),
                    (1, 0),
                    "{first} + {count}"
                );
            }
        }
    }
}
