//! The tree walks of `accept` against SPEC.md §4's beam-wise rules, computed naively per beam.

use proptest::prelude::*;
use redrafter::accept::{self, Accepted};
use redrafter::tree::DraftTree;

/// Random beams over a tiny vocabulary (so prefixes are shared), M in 1..=16, C in 1..=6.
fn beam_set() -> impl Strategy<Value = (Vec<u32>, usize, usize)> {
    (1usize..=16, 1usize..=6, 1u32..=3).prop_flat_map(|(m, c, vocab)| {
        (
            Just(m),
            Just(c),
            0..vocab,
            prop::collection::vec(0..vocab, m * c),
        )
            .prop_map(|(m, c, g0, mut beams)| {
                for i in 0..m {
                    beams[i * c] = g0;
                }
                (beams, m, c)
            })
    })
}

/// Per-node verdicts that often agree with a child (otherwise walks would stop at the root):
/// `choice[n] % (children + 1)` picks a child's token or, for the last value, a token from
/// `0..4` that may or may not match.
fn verdicts(tree: &DraftTree, choice: &[u32]) -> Vec<u32> {
    (0..tree.len())
        .map(|n| {
            let ch = tree.children(n);
            let pick = choice[n] as usize % (ch.len() + 1);
            if pick < ch.len() {
                tree.tokens()[ch[pick]]
            } else {
                (choice[n] / 7) % 4
            }
        })
        .collect()
}

/// SPEC §4 greedy, beam-wise: y[i,k] = verdict at (i,k); n_i = leading run of
/// beams[i,k+1] == y[i,k]; first i with the largest n_i. Returns (i*, n, bonus, hidden-state
/// node) with the hidden state's node being `unpacker[i*, n]`.
fn spec_greedy(tree: &DraftTree, beams: &[u32], verdict: &[u32]) -> (usize, usize, u32, usize) {
    let (m, c) = (tree.beam_width(), tree.beam_length());
    let un = tree.unpacker();
    let y = |i: usize, k: usize| verdict[un[i * c + k]];
    let mut best = (0usize, 0usize);
    for i in 0..m {
        let n = (0..c - 1)
            .take_while(|&k| beams[i * c + k + 1] == y(i, k))
            .count();
        if n > best.1 {
            best = (i, n);
        }
    }
    let (i, n) = best;
    (i, n, y(i, n), un[i * c + n])
}

fn check_beam_path(
    tree: &DraftTree,
    beams: &[u32],
    a: &Accepted,
    beam: usize,
    n: usize,
) -> Result<(), TestCaseError> {
    let c = tree.beam_length();
    let un = tree.unpacker();
    prop_assert_eq!(a.drafted(), n);
    prop_assert_eq!(&a.path[..], &un[beam * c..=beam * c + n]);
    let emitted = a.emitted(tree);
    prop_assert_eq!(&emitted[..n], &beams[beam * c + 1..=beam * c + n]);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn greedy_walk_equals_longest_matching_beam(
        (beams, m, c) in beam_set(),
        choice in prop::collection::vec(any::<u32>(), 96),
    ) {
        let tree = DraftTree::pack(&beams, m, c).unwrap();
        let verdict = verdicts(&tree, &choice);
        let a = accept::walk(&tree, &verdict).unwrap();
        let (beam, n, bonus, hidden_node) = spec_greedy(&tree, &beams, &verdict);
        check_beam_path(&tree, &beams, &a, beam, n)?;
        prop_assert_eq!(a.bonus, bonus);
        prop_assert_eq!(a.last(), hidden_node);
        // The chosen beam is the first owner of the last node.
        prop_assert_eq!(tree.owner(a.last()), Some(beam));
    }

    #[test]
    fn typical_equals_longest_acceptable_beam(
        (beams, m, c) in beam_set(),
        probs in prop::collection::vec(0.0f32..1.0, 96),
        entropy in prop::collection::vec(0.0f32..3.0, 96),
        epsilon in 0.0f32..0.6,
        delta in 0.0f32..0.8,
    ) {
        let tree = DraftTree::pack(&beams, m, c).unwrap();
        let l = tree.len();
        let verdict: Vec<u32> = (0..l as u32).map(|n| 1000 + n).collect();
        let a = accept::typical(&tree, &probs[..l], &entropy[..l], &verdict, epsilon, delta)
            .unwrap();
        // Naive per beam: leading run of acceptable drafted tokens, first beam on ties.
        let un = tree.unpacker();
        let ok = |i: usize, k: usize| {
            let (n, child) = (un[i * c + k], un[i * c + k + 1]);
            probs[child] > epsilon.min(delta * (-entropy[n]).exp())
        };
        let mut best = (0usize, 0usize);
        for i in 0..m {
            let n = (0..c - 1).take_while(|&k| ok(i, k)).count();
            if n > best.1 {
                best = (i, n);
            }
        }
        check_beam_path(&tree, &beams, &a, best.0, best.1)?;
        prop_assert_eq!(a.bonus, 1000 + a.last() as u32);
    }

    #[test]
    fn reference_parity_equals_per_beam_rule(
        (beams, m, c) in beam_set(),
        p in prop::collection::vec(0.0f32..1.0, 80),
        q in prop::collection::vec(0.01f32..1.0, 80),
        u in prop::collection::vec(0.0f32..1.0, 80),
    ) {
        let tree = DraftTree::pack(&beams, m, c).unwrap();
        let s = m * (c - 1);
        let verdict: Vec<u32> = (0..tree.len() as u32).collect();
        let a = accept::reference_parity(&tree, &p[..s], &q[..s], &u[..s], &verdict).unwrap();
        let mut best = (0usize, 0usize);
        for i in 0..m {
            let n = (0..c - 1)
                .take_while(|&k| {
                    let j = i * (c - 1) + k;
                    u[j] < p[j] / q[j]
                })
                .count();
            if n > best.1 {
                best = (i, n);
            }
        }
        check_beam_path(&tree, &beams, &a, best.0, best.1)?;
        prop_assert_eq!(a.bonus, a.last() as u32);
    }
}
