//! The log as C2SP `tlog-tiles` (<https://c2sp.org/tlog-tiles>): the tree's
//! hashes as tiles of 256 consecutive hashes at every eighth level, and the
//! leaves as entry bundles of 256, each at a static path. A client fetches
//! the tiles it needs and computes any root or proof itself, with the same
//! RFC 6962 code as the rest of the log ([`TileReader`] reads a tree from
//! tiles as [`super::merkle::HashReader`]).
//!
//! Paths: `tile/<L>/<N>[.p/<W>]` and `tile/entries/<N>[.p/<W>]`, where `<L>`
//! is 0..=63 without leading zeros, `<N>` is the index in zero-padded 3-digit
//! elements all but the last prefixed with `x` (`x001/x234/067`), and `<W>`
//! is the width of a partial tile, 1..=255 without leading zeros. Only the
//! canonical spelling of a tile parses, so that each tile has one path.
//!
//! Trust: nothing here trusts the bytes it is given; [`TileReader`] checks
//! each tile's length, and what it computes is worth only as much as the
//! signed checkpoint it is compared with.

use std::collections::HashMap;
use std::sync::Mutex;

use super::merkle::{self, Hash, HashReader};

/// Hashes in a full tile, and leaves in a full entry bundle.
pub const TILE_WIDTH: u64 = 256;
/// The longest leaf an entry bundle can carry (its length is a big-endian
/// `u16`): the log's own leaf bound, which refuses to write a longer one.
pub const MAX_ENTRY_BYTES: usize = super::leaf::MAX_LEAF_BYTES;

/// A tile of hashes, or an entry bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tile {
    /// `None` for an entry bundle; else the tile level (tree level `8·L`).
    pub level: Option<u8>,
    /// The tile's index within its level.
    pub index: u64,
    /// Hashes (or entries) in it: 256 for a full tile, 1..=255 for a partial one.
    pub width: u16,
}

/// Why a tile path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TilePathError {
    /// Not a tile path of the C2SP layout, or not its canonical spelling.
    #[error("not a tlog-tiles path: {0}")]
    Malformed(String),
}

impl TilePathError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            TilePathError::Malformed(_) => "tile_path_malformed",
        }
    }
}

impl Tile {
    /// The tile of hashes at `level` (0..=63) and `index`, `width` wide.
    pub fn hashes(level: u8, index: u64, width: u16) -> Self {
        Tile {
            level: Some(level),
            index,
            width,
        }
    }

    /// The entry bundle `index`, `width` wide.
    pub fn entries(index: u64, width: u16) -> Self {
        Tile {
            level: None,
            index,
            width,
        }
    }

    /// Whether it is full (256 wide).
    pub fn is_full(&self) -> bool {
        u64::from(self.width) == TILE_WIDTH
    }

    /// The tree level of the hashes in it: `8·L` (0 for entry bundles).
    pub fn tree_level(&self) -> u32 {
        u32::from(self.level.unwrap_or(0)) * 8
    }

    /// The index, at [`Self::tree_level`], of its first hash.
    ///
    /// # Errors
    /// `None` when the index overflows (no such tile in any real tree).
    pub fn first_node(&self) -> Option<u64> {
        self.index.checked_mul(TILE_WIDTH)
    }

    /// The number of leaves a tree needs for every hash of this tile to be
    /// final: `(first_node + width) · 256^L`.
    pub fn needs_tree_size(&self) -> Option<u64> {
        let nodes = self.first_node()?.checked_add(u64::from(self.width))?;
        let span = 1u64.checked_shl(self.tree_level())?;
        nodes.checked_mul(span)
    }

    /// The tile at tile level `level` holding hash `node` (of tree level
    /// `8·level`) in a tree of `size` leaves: full if the tree completes it,
    /// else partial. `None` if the tree does not hold that hash yet.
    pub fn covering(level: u8, node: u64, size: u64) -> Option<Self> {
        let span = 1u64.checked_shl(u32::from(level) * 8)?;
        let nodes = size / span;
        if node >= nodes {
            return None;
        }
        let index = node / TILE_WIDTH;
        let width = (nodes - index * TILE_WIDTH).min(TILE_WIDTH);
        Some(Tile::hashes(level, index, width as u16))
    }

    /// Its path below the log's prefix: `tile/<L>/<N>[.p/<W>]` or
    /// `tile/entries/<N>[.p/<W>]`.
    pub fn path(&self) -> String {
        let kind = match self.level {
            Some(l) => l.to_string(),
            None => "entries".to_string(),
        };
        let mut path = format!("tile/{kind}/{}", encode_index(self.index));
        if !self.is_full() {
            path.push_str(&format!(".p/{}", self.width));
        }
        path
    }

    /// Parses the part of a path after `tile/`, e.g. `0/x001/234` or
    /// `entries/005.p/17`. Only the canonical spelling parses.
    ///
    /// # Errors
    /// [`TilePathError::Malformed`] naming what is wrong.
    pub fn parse(path: &str) -> Result<Self, TilePathError> {
        // The path as sent, for the message: escaped (a control or
        // bidirectional character cannot forge lines or reorder text where
        // it is shown) and cut short.
        let shown = {
            let head: String = path.chars().take(MAX_SHOWN_PATH_CHARS).collect();
            let more = if head.len() < path.len() { "…" } else { "" };
            format!("{}{more}", crate::codec::escape_for_terminal(&head))
        };
        let bad = |why: &str| TilePathError::Malformed(format!("{shown}: {why}"));
        let mut segments: Vec<&str> = path.split('/').collect();
        if segments.len() < 2 {
            return Err(bad("need a level (or `entries`) and an index"));
        }
        let kind = segments.remove(0);
        let level = if kind == "entries" {
            None
        } else {
            let level = decimal(kind, 63).ok_or_else(|| bad("the level is 0 to 63"))?;
            Some(level as u8)
        };
        // A partial tile ends in `<last>.p/<W>`.
        let mut width = TILE_WIDTH as u16;
        if segments.len() >= 2 {
            let last = segments.len() - 2;
            // One `.p` suffix exactly: `000.p.p/5` is not a second name of
            // `000.p/5`.
            if let Some(index) = segments[last].strip_suffix(".p") {
                segments[last] = index;
                let w = segments.pop().unwrap_or_default();
                width = decimal(w, 255)
                    .filter(|w| *w >= 1)
                    .ok_or_else(|| bad("a partial width is 1 to 255"))?
                    as u16;
            }
        }
        let index = decode_index(&segments).map_err(|problem| match problem {
            IndexProblem::Spelling => {
                bad("the index is zero-padded 3-digit elements, all but the last starting with `x`")
            }
            IndexProblem::TooLarge => bad("the index is above 2^64 - 1"),
        })?;
        Ok(Tile {
            level,
            index,
            width,
        })
    }
}

/// A decimal without leading zeros, at most `max`.
fn decimal(s: &str, max: u64) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok().filter(|v| *v <= max)
}

/// `1234067` → `x001/x234/067`.
pub fn encode_index(mut n: u64) -> String {
    let mut groups = vec![format!("{:03}", n % 1000)];
    n /= 1000;
    while n > 0 {
        groups.push(format!("x{:03}", n % 1000));
        n /= 1000;
    }
    groups.reverse();
    groups.join("/")
}

/// The most characters of a tile path a refusal message shows.
const MAX_SHOWN_PATH_CHARS: usize = 100;

/// Why [`decode_index`] refused.
enum IndexProblem {
    /// Not the canonical spelling.
    Spelling,
    /// Canonically spelled, but not a `u64`.
    TooLarge,
}

/// The inverse of [`encode_index`], canonical spellings only.
fn decode_index(segments: &[&str]) -> Result<u64, IndexProblem> {
    let (last, rest) = segments.split_last().ok_or(IndexProblem::Spelling)?;
    let mut groups = Vec::with_capacity(segments.len());
    for (i, s) in rest.iter().enumerate() {
        let group = s
            .strip_prefix('x')
            .and_then(three_digits)
            .ok_or(IndexProblem::Spelling)?;
        // No leading `x000` element: one spelling per index.
        if i == 0 && group == 0 {
            return Err(IndexProblem::Spelling);
        }
        groups.push(group);
    }
    groups.push(three_digits(last).ok_or(IndexProblem::Spelling)?);
    groups.into_iter().try_fold(0u64, |n, group| {
        n.checked_mul(1000)
            .and_then(|n| n.checked_add(group))
            .ok_or(IndexProblem::TooLarge)
    })
}

/// Exactly three ASCII digits.
fn three_digits(s: &str) -> Option<u64> {
    if s.len() != 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Concatenates `hashes` into a tile's bytes.
pub fn encode_hashes(hashes: &[Hash]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.iter().copied()).collect()
}

/// An entry bundle: each leaf as a big-endian `u16` length and its bytes.
///
/// # Errors
/// The index of a leaf longer than [`MAX_ENTRY_BYTES`] (the log never
/// writes one).
pub fn encode_bundle(leaves: &[Vec<u8>]) -> Result<Vec<u8>, usize> {
    let mut out = Vec::with_capacity(leaves.iter().map(|l| l.len() + 2).sum());
    for (i, leaf) in leaves.iter().enumerate() {
        let len = u16::try_from(leaf.len()).map_err(|_| i)?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(leaf);
    }
    Ok(out)
}

/// Why fetched tile bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TileError {
    /// A tile of hashes whose length is not 32 × its width.
    #[error("{path}: {got} bytes, a tile {width} wide has {} bytes", usize::from(*width) * 32)]
    HashTileLength {
        /// The tile's path.
        path: String,
        /// Its width.
        width: u16,
        /// The bytes received.
        got: usize,
    },
    /// An entry bundle that does not hold exactly its width of entries.
    #[error("{path}: not an entry bundle of {width} entries: {why}")]
    Bundle {
        /// The bundle's path.
        path: String,
        /// Its width.
        width: u16,
        /// What was wrong.
        why: String,
    },
    /// The source could not give the tile.
    #[error("{path}: {why}")]
    Fetch {
        /// The tile's path.
        path: String,
        /// Why.
        why: String,
    },
    /// A hash outside the tree the reader was made for.
    #[error("hash ({level}, {index}) is outside a tree of {size} leaves")]
    OutsideTree {
        /// Its tree level.
        level: u8,
        /// Its index.
        index: u64,
        /// The tree size.
        size: u64,
    },
}

impl TileError {
    /// The stable error code: what `lavd audit verify --tiles` prints before
    /// the message.
    pub fn code(&self) -> &'static str {
        match self {
            TileError::HashTileLength { .. } => "tile_length_mismatch",
            TileError::Bundle { .. } => "bundle_malformed",
            TileError::Fetch { .. } => "tile_unavailable",
            TileError::OutsideTree { .. } => "tile_outside_tree",
        }
    }
}

/// Splits an entry bundle `tile` into its leaves.
///
/// # Errors
/// [`TileError::Bundle`] for anything but exactly `tile.width` entries.
pub fn decode_bundle(tile: &Tile, bytes: &[u8]) -> Result<Vec<Vec<u8>>, TileError> {
    let bad = |why: String| TileError::Bundle {
        path: tile.path(),
        width: tile.width,
        why,
    };
    let mut leaves = Vec::with_capacity(usize::from(tile.width));
    let mut rest = bytes;
    while !rest.is_empty() {
        let [hi, lo, tail @ ..] = rest else {
            return Err(bad("a truncated length".into()));
        };
        // Counted before each is kept: a bundle of many empty entries is
        // refused at the first one too many, not after holding them all.
        if leaves.len() == usize::from(tile.width) {
            return Err(bad(format!("more than {} entries", tile.width)));
        }
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if tail.len() < len {
            return Err(bad(format!("entry {} is truncated", leaves.len())));
        }
        leaves.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    if leaves.len() != usize::from(tile.width) {
        return Err(bad(format!("{} entries", leaves.len())));
    }
    Ok(leaves)
}

/// Where a [`TileReader`] gets tile bytes: a directory, an HTTP client.
pub trait TileSource {
    /// The bytes of `tile`.
    ///
    /// # Errors
    /// Why it could not be had.
    fn fetch(&self, tile: &Tile) -> Result<Vec<u8>, String>;
}

/// A tree of `size` leaves read from tiles: any complete subtree hash of it
/// is computed from the one tile holding its level-`8·L` descendants, so the
/// log's own root and proof code runs on tiles unchanged. Each tile is
/// fetched once and its length checked.
#[derive(Debug)]
pub struct TileReader<S> {
    source: S,
    size: u64,
    cache: Mutex<HashMap<Tile, Vec<Hash>>>,
}

impl<S: TileSource> TileReader<S> {
    /// A reader of the tree of `size` leaves from `source`.
    pub fn new(source: S, size: u64) -> Self {
        TileReader {
            source,
            size,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The tree size it reads.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The hashes of `tile`, fetched once.
    ///
    /// # Errors
    /// [`TileError::Fetch`], [`TileError::HashTileLength`].
    pub fn tile(&self, tile: &Tile) -> Result<Vec<Hash>, TileError> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(hashes) = cache.get(tile) {
            return Ok(hashes.clone());
        }
        let bytes = self.source.fetch(tile).map_err(|why| TileError::Fetch {
            path: tile.path(),
            why,
        })?;
        if bytes.len() != usize::from(tile.width) * 32 {
            return Err(TileError::HashTileLength {
                path: tile.path(),
                width: tile.width,
                got: bytes.len(),
            });
        }
        let hashes: Vec<Hash> = bytes
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        cache.insert(*tile, hashes.clone());
        Ok(hashes)
    }

    /// The source, for entry bundles.
    pub fn source(&self) -> &S {
        &self.source
    }
}

impl<S: TileSource> HashReader for TileReader<S> {
    type Error = TileError;

    fn subtree(&self, level: u8, index: u64) -> Result<Hash, TileError> {
        let outside = TileError::OutsideTree {
            level,
            index,
            size: self.size,
        };
        // Its descendants at tree level 8·L: 2^r consecutive hashes, all in
        // one tile since 2^r divides 256.
        let (tile_level, r) = (level / 8, level % 8);
        // `checked_shl` would check only the shift's size, not the bits
        // shifted out.
        let count = 1u64 << r;
        let first = index.checked_mul(count).ok_or(outside.clone())?;
        let last = first.checked_add(count - 1).ok_or(outside.clone())?;
        let tile = Tile::covering(tile_level, last, self.size).ok_or(outside)?;
        let hashes = self.tile(&tile)?;
        let offset = (first - tile.index * TILE_WIDTH) as usize;
        let mut row: Vec<Hash> = hashes[offset..offset + count as usize].to_vec();
        while row.len() > 1 {
            row = row
                .chunks_exact(2)
                .map(|p| merkle::node_hash(&p[0], &p[1]))
                .collect();
        }
        Ok(row[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::MemoryTree;

    #[test]
    fn index_encoding_follows_the_spec_example() {
        // The example of c2sp.org/tlog-tiles.
        assert_eq!(encode_index(1_234_067), "x001/x234/067");
        assert_eq!(encode_index(0), "000");
        assert_eq!(encode_index(999), "999");
        assert_eq!(encode_index(1000), "x001/000");
        for n in [0, 1, 255, 999, 1000, 1_234_067, u64::MAX] {
            let tile = Tile::hashes(0, n, 256);
            assert_eq!(Tile::parse(&tile.path()["tile/".len()..]), Ok(tile));
        }
    }

    #[test]
    fn only_canonical_paths_parse() {
        assert_eq!(
            Tile::parse("1/x001/x234/067.p/17"),
            Ok(Tile::hashes(1, 1_234_067, 17))
        );
        assert_eq!(Tile::parse("entries/005"), Ok(Tile::entries(5, 256)));
        for bad in [
            "",
            "0",
            "00/000",
            "64/000",
            "0/1",
            "0/0001",
            "0/x000/001",
            "0/001/002",
            "0/x1/000",
            "0/000.p/0",
            "0/000.p/256",
            "0/000.p/017",
            "0/000.p/",
            "0/000.q/1",
            "entry/000",
            "0/x001",
            "0/-01",
            "0/000/.p/1",
            // Found by fuzz/regressions/tiles/partial-suffix-twice.
            "0/000.p.p/5",
            "entries/x001.p.p/5",
        ] {
            assert!(Tile::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    /// A canonically spelled index above `u64::MAX` is refused as too large,
    /// not as a misspelling; the largest index parses.
    #[test]
    fn an_index_above_u64_is_refused_as_too_large() {
        let max = Tile::parse("0/x018/x446/x744/x073/x709/x551/615").unwrap();
        assert_eq!(max.index, u64::MAX);
        let Err(TilePathError::Malformed(m)) = Tile::parse("0/x018/x446/x744/x073/x709/x551/616")
        else {
            panic!("u64::MAX + 1 parsed");
        };
        assert!(m.ends_with("the index is above 2^64 - 1"), "{m}");
        let Err(TilePathError::Malformed(m)) = Tile::parse("0/x1000/000") else {
            panic!("a 4-digit element parsed");
        };
        assert!(m.contains("zero-padded 3-digit"), "{m}");
    }

    /// The path in a refusal is escaped and cut short: a bidirectional
    /// override or a line break sent in it is shown as an escape.
    #[test]
    fn a_refused_path_is_shown_escaped_and_cut_short() {
        let Err(TilePathError::Malformed(m)) = Tile::parse("0/\u{202e}abc\nx") else {
            panic!("parsed");
        };
        assert!(m.starts_with("0/\\u{202e}abc\\nx: "), "{m}");
        let long = format!("0/{}", "1".repeat(5000));
        let Err(TilePathError::Malformed(m)) = Tile::parse(&long) else {
            panic!("parsed");
        };
        assert!(m.starts_with(&format!("{}…: ", &long[..100])), "{m}");
    }

    #[test]
    fn the_spec_example_tree_of_70000_has_its_tiles() {
        // c2sp.org/tlog-tiles: a tree of 70,000 has 273 full level-0 tiles,
        // a partial level-0 tile of width 112, one full level-1 tile, a
        // partial level-1 tile of width 17, a partial level-2 tile of width 1.
        let size = 70_000;
        assert_eq!(
            Tile::covering(0, 272 * 256, size),
            Some(Tile::hashes(0, 272, 256))
        );
        assert_eq!(
            Tile::covering(0, 273 * 256, size),
            Some(Tile::hashes(0, 273, 112))
        );
        assert_eq!(Tile::covering(1, 0, size), Some(Tile::hashes(1, 0, 256)));
        assert_eq!(Tile::covering(1, 256, size), Some(Tile::hashes(1, 1, 17)));
        assert_eq!(Tile::covering(2, 0, size), Some(Tile::hashes(2, 0, 1)));
        assert_eq!(Tile::covering(3, 0, size), None);
        // And a tree of 256: a full level-0 tile and a level-1 tile of width 1.
        assert_eq!(Tile::covering(1, 0, 256), Some(Tile::hashes(1, 0, 1)));
        assert_eq!(
            Tile::hashes(1, 1, 17).needs_tree_size(),
            Some((256 + 17) * 256)
        );
    }

    /// Tiles made from an in-memory tree, as a log would serve them.
    struct Memory(MemoryTree);

    impl TileSource for Memory {
        fn fetch(&self, tile: &Tile) -> Result<Vec<u8>, String> {
            let first = tile.first_node().ok_or("overflow")?;
            let level = u8::try_from(tile.tree_level()).map_err(|e| e.to_string())?;
            let hashes: Result<Vec<Hash>, _> = (first..first + u64::from(tile.width))
                .map(|i| self.0.subtree(level, i))
                .collect();
            Ok(encode_hashes(&hashes.map_err(|e| e.to_string())?))
        }
    }

    #[test]
    fn roots_and_proofs_from_tiles_equal_the_trees() {
        let mut tree = MemoryTree::new();
        for i in 0..70_000u32 {
            tree.push_leaf(&i.to_be_bytes());
        }
        for size in [1u64, 255, 256, 257, 65_535, 65_536, 65_537, 70_000] {
            let reader = TileReader::new(Memory(tree.clone()), size);
            assert_eq!(
                merkle::root(&reader, size).unwrap(),
                tree.root(size).unwrap(),
                "{size}"
            );
            let index = size / 3;
            assert_eq!(
                merkle::inclusion_proof(&reader, index, size).unwrap(),
                merkle::inclusion_proof(&tree, index, size).unwrap()
            );
            assert_eq!(
                merkle::consistency_proof(&reader, index.max(1), size).unwrap(),
                merkle::consistency_proof(&tree, index.max(1), size).unwrap()
            );
        }
        // Beyond the tree: an error, not a guess.
        let reader = TileReader::new(Memory(tree.clone()), 300);
        assert!(merkle::root(&reader, 301).is_err());
    }

    /// A subtree whose first leaf is past `u64` is outside the tree, not a
    /// wrapped index (`1 << 63` at level 1 wrapped to leaf 0: leaves 0
    /// and 1's hash).
    #[test]
    fn a_subtree_index_past_u64_is_outside_the_tree() {
        let mut tree = MemoryTree::new();
        for i in 0..2u32 {
            tree.push_leaf(&i.to_be_bytes());
        }
        let reader = TileReader::new(Memory(tree), 2);
        assert!(reader.subtree(1, 0).is_ok());
        assert!(matches!(
            reader.subtree(1, 1 << 63),
            Err(TileError::OutsideTree { .. })
        ));
        assert!(matches!(
            reader.subtree(7, u64::MAX >> 7),
            Err(TileError::OutsideTree { .. })
        ));
    }

    #[test]
    fn a_hash_tile_of_the_wrong_length_is_refused() {
        struct Short;
        impl TileSource for Short {
            fn fetch(&self, _: &Tile) -> Result<Vec<u8>, String> {
                Ok(vec![0; 31])
            }
        }
        let reader = TileReader::new(Short, 1);
        assert!(matches!(
            reader.subtree(0, 0),
            Err(TileError::HashTileLength { got: 31, .. })
        ));
    }

    #[test]
    fn bundles_round_trip_and_refuse_what_is_not_one() {
        let leaves = vec![b"a".to_vec(), vec![], vec![7; 300]];
        let tile = Tile::entries(0, 3);
        let bytes = encode_bundle(&leaves).unwrap();
        assert_eq!(&bytes[..3], &[0, 1, b'a']);
        assert_eq!(decode_bundle(&tile, &bytes).unwrap(), leaves);
        assert!(decode_bundle(&Tile::entries(0, 2), &bytes).is_err());
        assert!(decode_bundle(&tile, &bytes[..bytes.len() - 1]).is_err());
        assert!(decode_bundle(&tile, &bytes[..1]).is_err());
        // Refused at the first entry past the width, not after reading all
        // 500 empty ones.
        let many = decode_bundle(&tile, &[0u8; 1000]).unwrap_err().to_string();
        assert!(many.ends_with("more than 3 entries"), "{many}");
        assert_eq!(encode_bundle(&[vec![0; MAX_ENTRY_BYTES + 1]]), Err(0));
        assert!(encode_bundle(&[vec![0; MAX_ENTRY_BYTES]]).is_ok());
    }
}
