//! Tile paths and entry bundles (C2SP tlog-tiles): only the canonical path
//! of a tile parses and it comes back exactly; bundles round trip; edits are
//! typed refusals.

use lavd::audit::tiles::{decode_bundle, encode_bundle, Tile};
use proptest::prelude::*;

use crate::common::{self, apply, edits};
use crate::targets;

fn tile() -> impl Strategy<Value = Tile> {
    (
        prop::option::of(0u8..=63),
        prop_oneof![0u64..2000, any::<u64>()],
        prop_oneof![Just(256u16), 1u16..=255],
    )
        .prop_map(|(level, index, width)| Tile {
            level,
            index,
            width,
        })
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn arbitrary_paths(path in "[0-9a-z./x]{0,40}", bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        targets::tiles(path.as_bytes());
        targets::tiles(&bytes);
    }

    #[test]
    fn path_round_trip(t in tile(), edits in edits()) {
        let path = t.path();
        let rest = path.strip_prefix("tile/").unwrap();
        prop_assert_eq!(Tile::parse(rest), Ok(t));
        targets::tiles(&apply(rest.as_bytes(), &edits));
    }

    #[test]
    fn bundle_round_trip(leaves in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..80), 1..=256), edits in edits()) {
        let bytes = encode_bundle(&leaves).unwrap();
        let tile = Tile::entries(0, leaves.len() as u16);
        prop_assert_eq!(decode_bundle(&tile, &bytes), Ok(leaves.clone()));
        let edited = apply(&bytes, &edits);
        if let Ok(got) = decode_bundle(&tile, &edited) {
            prop_assert_eq!(encode_bundle(&got), Ok(edited.clone()));
        }
        targets::tiles(&edited);
    }
}

#[test]
fn a_long_leaf_is_refused_by_the_encoder() {
    assert_eq!(encode_bundle(&[vec![0; 3], vec![0; 65_536]]), Err(1));
}
