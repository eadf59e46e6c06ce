//! Property tests of the draft-tree packing (SPEC.md §3) against naive constructions.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use redrafter::tree::{DraftTree, PackedBatch};

/// A random beam set `(beams, M, C)` with heavy duplication: a tiny vocabulary, and each beam
/// either fresh or a copy of an earlier beam with a random suffix rewritten.
fn beam_set() -> impl Strategy<Value = (Vec<u32>, usize, usize)> {
    (1usize..=16, 1usize..=6, 1u32..=4).prop_flat_map(|(m, c, vocab)| {
        let beam = prop::collection::vec(0..vocab, c);
        let recipe = (any::<bool>(), any::<prop::sample::Index>(), 0..=c, beam);
        (Just(m), Just(c), 0..vocab, prop::collection::vec(recipe, m)).prop_map(
            |(m, c, g0, recipes)| {
                let mut beams: Vec<u32> = Vec::with_capacity(m * c);
                for (i, (copy, src, keep, fresh)) in recipes.into_iter().enumerate() {
                    let start = beams.len();
                    if copy && i > 0 {
                        let j = src.index(i);
                        beams.extend_from_within(j * c..j * c + keep);
                        beams.extend_from_slice(&fresh[keep..]);
                    } else {
                        beams.extend_from_slice(&fresh);
                    }
                    beams[start] = g0;
                }
                (beams, m, c)
            },
        )
    })
}

/// SPEC §3 computed literally: pairwise prefix matches, first-max argmax, keep, segment starts,
/// offsets. Returns (packed tokens, unpacker).
fn spec_pack(beams: &[u32], m: usize, c: usize) -> (Vec<u32>, Vec<usize>) {
    let tok = |i: usize, k: usize| beams[i * c + k];
    // pm[i][j][k]: tokens 0..=k of beams i and j all equal (cumsum of matches == k + 1).
    let pm = |i: usize, j: usize, k: usize| {
        let matches: usize = (0..=k)
            .map(|kk| usize::from(tok(i, kk) == tok(j, kk)))
            .sum();
        matches == k + 1
    };
    let mut tree = vec![0usize; m * c];
    for i in 0..m {
        for k in 0..c {
            tree[i * c + k] = (0..m).find(|&j| pm(i, j, k)).unwrap();
        }
    }
    let keep = |i: usize, k: usize| tree[i * c + k] == i;
    let mut packed = Vec::new();
    for i in 0..m {
        for k in 0..c {
            if keep(i, k) {
                packed.push(tok(i, k));
            }
        }
    }
    let seg_len: Vec<usize> = (0..m)
        .map(|i| (0..c).filter(|&k| keep(i, k)).count())
        .collect();
    let mut seg_start = vec![0usize; m];
    for i in 1..m {
        seg_start[i] = seg_start[i - 1] + seg_len[i - 1];
    }
    let mut unpacker = vec![0usize; m * c];
    for i in 0..m {
        for k in 0..c {
            let segidx = seg_start[tree[i * c + k]];
            let offset = (0..k)
                .filter(|&kk| seg_start[tree[i * c + kk]] == segidx)
                .count();
            unpacker[i * c + k] = segidx + offset;
        }
    }
    (packed, unpacker)
}

/// The set of distinct non-empty beam prefixes, found by inserting beams into a map in order.
fn naive_prefixes(beams: &[u32], m: usize, c: usize) -> BTreeMap<Vec<u32>, usize> {
    let mut first_owner = BTreeMap::new();
    for i in 0..m {
        for k in 0..c {
            first_owner
                .entry(beams[i * c..i * c + k + 1].to_vec())
                .or_insert(i);
        }
    }
    first_owner
}

/// The token sequence of the path root..=node.
fn path_tokens(tree: &DraftTree, node: usize) -> Vec<u32> {
    tree.path(node).iter().map(|&n| tree.tokens()[n]).collect()
}

fn check_tree(beams: &[u32], m: usize, c: usize) -> Result<(), TestCaseError> {
    let tree = DraftTree::pack(beams, m, c).unwrap();
    let l = tree.len();
    let unpacker = tree.unpacker();
    prop_assert_eq!(tree.beam_width(), m);
    prop_assert_eq!(tree.beam_length(), c);
    prop_assert!(l <= 1 + m * (c - 1));
    prop_assert_eq!(tree.tokens().len(), l);
    prop_assert_eq!(tree.depths().len(), l);
    prop_assert_eq!(unpacker.len(), m * c);

    // Identical to SPEC's literal construction, order included.
    let (spec_tokens, spec_unpacker) = spec_pack(beams, m, c);
    prop_assert_eq!(tree.tokens(), &spec_tokens[..]);
    prop_assert_eq!(unpacker, &spec_unpacker[..]);

    // Every beam is recovered through the unpacker, along parent links.
    for i in 0..m {
        for k in 0..c {
            let n = unpacker[i * c + k];
            prop_assert_eq!(tree.tokens()[n], beams[i * c + k]);
            prop_assert_eq!(tree.depths()[n], k);
            let expected_parent = if k == 0 {
                None
            } else {
                Some(unpacker[i * c + k - 1])
            };
            prop_assert_eq!(tree.parent(n), expected_parent);
        }
    }

    // Node set equals the naive trie's: one node per distinct prefix, owned by its first beam.
    let prefixes = naive_prefixes(beams, m, c);
    prop_assert_eq!(prefixes.len(), l);
    let mut seen = BTreeSet::new();
    for n in 0..l {
        let toks = path_tokens(&tree, n);
        prop_assert_eq!(prefixes.get(&toks).copied(), tree.owner(n));
        prop_assert!(seen.insert(toks), "prefix packed twice");
    }

    // Structure: parents precede children, depths increase by one, children lists agree with
    // parent links, are in packing order, and carry distinct tokens.
    let mut child_count = 0;
    let mut pairs = BTreeSet::new();
    for n in 0..l {
        if let Some(p) = tree.parent(n) {
            prop_assert!(p < n, "parent {} after child {}", p, n);
            prop_assert_eq!(tree.depths()[n], tree.depths()[p] + 1);
            prop_assert!(tree.children(p).contains(&n));
            prop_assert!(
                pairs.insert((p, tree.tokens()[n])),
                "duplicate (parent, token)"
            );
        } else {
            prop_assert_eq!(n, 0);
        }
        let children = tree.children(n);
        prop_assert!(children.windows(2).all(|w| w[0] < w[1]));
        for &ch in children {
            prop_assert_eq!(tree.parent(ch), Some(n));
            prop_assert_eq!(tree.child_with_token(n, tree.tokens()[ch]), Some(ch));
        }
        child_count += children.len();
        // Every node lies on some beam.
        prop_assert!(unpacker.contains(&n));
    }
    prop_assert_eq!(child_count, l - 1);

    // Ancestor mask row t is exactly the packed tokens of t's prefix.
    let mask = tree.ancestor_mask();
    prop_assert_eq!(mask.len(), l * l);
    for i in 0..m {
        for k in 0..c {
            let t = unpacker[i * c + k];
            let expected: BTreeSet<usize> = unpacker[i * c..=i * c + k].iter().copied().collect();
            let visible: BTreeSet<usize> = (0..l).filter(|&s| mask[t * l + s]).collect();
            prop_assert_eq!(&visible, &expected);
            prop_assert_eq!(tree.path(t), unpacker[i * c..=i * c + k].to_vec());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn packing_matches_spec_and_naive_trie((beams, m, c) in beam_set()) {
        check_tree(&beams, m, c)?;
    }

    #[test]
    fn packing_rejects_mismatched_roots((mut beams, m, c) in beam_set(), bump in 1u32..5) {
        prop_assume!(m > 1);
        let i = m - 1;
        beams[i * c] += bump;
        prop_assert!(DraftTree::pack(&beams, m, c).is_err());
        prop_assert!(DraftTree::pack(&beams[1..], m, c).is_err());
    }

    #[test]
    fn batch_pads_consistently(sets in prop::collection::vec(beam_set(), 1..5), pad in 0u32..100) {
        let trees: Vec<DraftTree> = sets
            .iter()
            .map(|(b, m, c)| DraftTree::pack(b, *m, *c).unwrap())
            .collect();
        let batch = PackedBatch::new(trees.clone()).unwrap();
        let lmax = batch.max_len();
        prop_assert_eq!(lmax, trees.iter().map(DraftTree::len).max().unwrap());
        let starts: Vec<usize> = (0..trees.len()).map(|b| 10 * b + 3).collect();
        let tokens = batch.tokens(pad);
        let positions = batch.positions(&starts).unwrap();
        let masks = batch.block_masks();
        prop_assert_eq!(batch.block_mask_flat(), masks.concat());
        prop_assert_eq!(tokens.len(), trees.len() * lmax);
        for (b, tree) in trees.iter().enumerate() {
            let l = tree.len();
            let mask = tree.ancestor_mask();
            for t in 0..lmax {
                let idx = b * lmax + t;
                if t < l {
                    prop_assert_eq!(tokens[idx], i64::from(tree.tokens()[t]));
                    prop_assert_eq!(positions[idx], (starts[b] + tree.depths()[t]) as i64);
                } else {
                    prop_assert_eq!(tokens[idx], i64::from(pad));
                    prop_assert_eq!(positions[idx], starts[b] as i64);
                }
                for s in 0..lmax {
                    let expected = if t < l && s < l { mask[t * l + s] } else { s == t && t >= l };
                    prop_assert_eq!(masks[b][t * lmax + s], expected, "row {} t {} s {}", b, t, s);
                }
            }
        }
    }
}

#[test]
fn known_lengths() {
    // (beams, M, C, L)
    let cases: &[(&[u32], usize, usize, usize)] = &[
        (&[0], 1, 1, 1),
        (&[0, 1, 2, 3, 4], 1, 5, 5),
        (&[0, 1, 0, 1], 2, 2, 2),
        (&[0, 1, 0, 2], 2, 2, 3),
        (&[5, 1, 1, 5, 1, 2, 5, 2, 1, 5, 2, 1], 4, 3, 6),
        (&[5, 1, 1, 5, 1, 1, 5, 1, 1, 5, 1, 1], 4, 3, 3),
        // Same token at the same depth under different parents stays separate.
        (&[0, 1, 3, 0, 2, 3], 2, 3, 5),
    ];
    for &(beams, m, c, l) in cases {
        let tree = DraftTree::pack(beams, m, c).unwrap();
        assert_eq!(tree.len(), l, "beams {beams:?}");
        check_tree(beams, m, c).unwrap();
    }
}
