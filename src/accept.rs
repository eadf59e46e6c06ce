//! Acceptance (SPEC.md §4): decide which drafted tokens of a packed [`DraftTree`] the target keeps.
//!
//! The decoder runs the target once on the packed tree, computes small per-node statistics on the
//! device (the target's verdict token, probabilities, entropies) and reads them back; the
//! functions here turn them into an [`Accepted`] path on the host. All inputs are indexed by
//! packed node (`[L]`) unless stated otherwise; node `n`'s statistics describe the target's
//! distribution of the token *after* node `n`, i.e. `p(· | context, path(n))`.
//!
//! Three rules:
//!
//! * [`walk`] serves both lossless modes. Greedy: `verdict[n]` = argmax of the target at `n`.
//!   Exact sampling: `verdict[n]` = one independent sample from the target at `n`.
//! * [`typical`]: Medusa-style typical acceptance (lossy).
//! * [`reference_parity`]: the published per-beam `u < p/q` rule, for comparison only; it is not
//!   distribution-exact.

use crate::tree::DraftTree;
use crate::{Error, Result};

/// The outcome of one round's acceptance for one batch row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Packed nodes from the root to the last accepted node, root always included. The target's
    /// KV rows of exactly these nodes are committed, and the hidden state of the last one seeds the
    /// next round's drafter.
    pub path: Vec<usize>,
    /// The token the target emits after the path (next round's `g0`). It is not cached this round.
    pub bonus: u32,
}

impl Accepted {
    /// Number of accepted drafted tokens (the path without the root).
    pub fn drafted(&self) -> usize {
        self.path.len().saturating_sub(1)
    }

    /// The last accepted node (the root if nothing was accepted).
    pub fn last(&self) -> usize {
        self.path.last().copied().unwrap_or(0)
    }

    /// Tokens this round emits after `g0`: the accepted drafted tokens, then the bonus token.
    /// Its length is τ for this round (`drafted() + 1`).
    pub fn emitted(&self, tree: &DraftTree) -> Vec<u32> {
        let tokens = tree.tokens();
        let mut out: Vec<u32> = self
            .path
            .iter()
            .skip(1)
            .filter_map(|&n| tokens.get(n).copied())
            .collect();
        out.push(self.bonus);
        out
    }
}

/// Checks that a per-node or per-(beam, depth) input has the length the tree implies.
fn check_len(what: &str, got: usize, expected: usize, unit: &str) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!(
            "`{what}` must have one entry per {unit} ({expected}), got {got}"
        )))
    }
}

/// Greedy and exact-sampling acceptance: follow the target's own choices through the tree.
///
/// `verdict[n]` is the token the target chooses after node `n` (`[L]`). Starting at the root: if
/// `verdict[node]` is the token of one of `node`'s children, move to that child (children carry
/// distinct tokens, so it is unique); otherwise stop. The path is every visited node and the
/// bonus is `verdict[last]`.
///
/// # Greedy (`verdict` = argmax): identical to SPEC's beam-wise rule
///
/// SPEC §4 computes, per beam `i`, the length `n_i` of the leading run of
/// `beams[i,k+1] == y[i,k]`, takes the first beam `i*` with the largest `n_i`, accepts
/// `beams[i*, 1..=n]` with bonus `y[i*, n]` and next hidden state at `(i*, n)`. Here
/// `y[i,k] = verdict[unpacker[i,k]]`: beams sharing a prefix share its node, hence its verdict.
///
/// * Every beam with run `n_i` is followed by the walk for `n_i` steps: at each of its nodes the
///   verdict equals the beam's next token, which is the token of exactly one child — the beam's
///   next node. So the walk's depth `D ≥ max n_i`.
/// * The walk's path is a prefix of some beam (every node lies on a beam), and along it every
///   verdict matched, so that beam has `n_i ≥ D`. Hence `D = max n_i`.
/// * Every beam achieving `D` shares the walk's path, so its node at depth `D` is the walk's last
///   node: the accepted tokens, the bonus `verdict[last]` and the hidden state's row (packed
///   node `last`, i.e. `unpacker[i*, D]`) all agree with SPEC, whichever maximal beam is first.
///
/// Greedy decoding is therefore token-for-token the target's own greedy decoding.
///
/// # Exact sampling (`verdict[n]` ~ p(· | n), independent per node): lossless
///
/// Each emitted token is the sample drawn at the node where it is emitted: a drafted token is
/// emitted at node `n` exactly when `verdict[n]` equals it, and the bonus is `verdict[last]`.
/// Whether the walk reaches `n` depends only on the samples at `n`'s ancestors, which are
/// independent of the sample at `n`; so conditioned on having emitted the path to `n`, the next
/// token is distributed exactly as `p(· | n)`. The tree only decides *where* the walk continues
/// (whether the next token's KV row and hidden state are already computed), never *what* is
/// emitted. The output is therefore distributed exactly as autoregressive sampling from the
/// target, for any candidate tree — beam search or not — and the expected number of accepted
/// drafted tokens is the target probability mass of the tree's paths. (Contrast
/// [`reference_parity`], whose `u < p/q` test presumes drafts sampled from `q`.)
///
/// # Errors
/// [`Error::InvalidConfig`] if `verdict` is not `[L]`.
pub fn walk(tree: &DraftTree, verdict: &[u32]) -> Result<Accepted> {
    check_len("verdict", verdict.len(), tree.len(), "packed node")?;
    let mut path = Vec::with_capacity(tree.beam_length());
    let mut node = 0usize;
    path.push(node);
    while let Some(child) = tree.child_with_token(node, verdict[node]) {
        node = child;
        path.push(node);
    }
    Ok(Accepted {
        path,
        bonus: verdict[node],
    })
}

/// Typical acceptance (Medusa-style, lossy).
///
/// A child `c` of node `n` is acceptable if `child_prob[c] > min(epsilon, delta * exp(-entropy[n]))`,
/// where `child_prob[c] = p(token_c | n)` under the target at the decoding temperature and
/// `entropy[n]` is the entropy (in nats) of `p(· | n)`. A confident target (low entropy) thus
/// demands a drafted token close to its preference; an uncertain one accepts anything reasonably
/// likely, capped by `epsilon`. The chosen path is the longest one from the root whose every
/// node is acceptable, the first in packing order on ties (the same as "first beam": at equal
/// depth, a node owned by a smaller beam is packed earlier). The bonus is `verdict[last]`, the
/// decoder's argmax or sample at the last node.
///
/// Inputs are `[L]`; `child_prob[0]` (the root has no parent) is ignored. NaN probabilities or
/// entropies make a node unacceptable.
///
/// # Errors
/// [`Error::InvalidConfig`] for wrong lengths; [`Error::InvalidSettings`] unless `epsilon` and
/// `delta` are finite and non-negative.
pub fn typical(
    tree: &DraftTree,
    child_prob: &[f32],
    entropy: &[f32],
    verdict: &[u32],
    epsilon: f32,
    delta: f32,
) -> Result<Accepted> {
    let len = tree.len();
    check_len("child_prob", child_prob.len(), len, "packed node")?;
    check_len("entropy", entropy.len(), len, "packed node")?;
    check_len("verdict", verdict.len(), len, "packed node")?;
    if !(epsilon.is_finite() && epsilon >= 0.0 && delta.is_finite() && delta >= 0.0) {
        return Err(Error::InvalidSettings(format!(
            "typical acceptance needs finite, non-negative epsilon and delta, got {epsilon} and {delta}"
        )));
    }

    // Parents precede children in packing order, so one forward pass decides for every node
    // whether its whole path is acceptable. Track the deepest such node, first on ties.
    let mut ok = vec![false; len];
    ok[0] = true;
    let mut best = 0usize;
    let depths = tree.depths();
    for (c, &prob) in child_prob.iter().enumerate().skip(1) {
        let Some(n) = tree.parent(c) else { continue };
        if !ok[n] {
            continue;
        }
        let threshold = epsilon.min(delta * (-entropy[n]).exp());
        if prob > threshold {
            ok[c] = true;
            if depths[c] > depths[best] {
                best = c;
            }
        }
    }
    Ok(Accepted {
        path: tree.path(best),
        bonus: verdict[best],
    })
}

/// The published rule (reference parity; **not distribution-exact**).
///
/// Per beam `i`, accept drafted token `k+1` while `uniforms[i][k] < p_{i,k} / q_{i,k}`, where
/// `p_{i,k}` is the target's and `q_{i,k}` the drafter's probability of `beams[i][k+1]` at
/// `(i, k)`; keep the beam with the most accepted tokens (first on ties). The bonus is
/// `verdict[stop node]`; to reproduce the reference, the decoder samples it from
/// `max(p − q, 0)` (normalised) at a rejection and from `p` after a fully accepted beam.
///
/// Why it is not exact: the `u < p/q` test with residual resampling is speculative sampling,
/// which reproduces `p` only if the drafted token was *sampled from `q`*. Beam search drafts are
/// deterministic top-scoring continuations, and keeping the best of several beams adds a second
/// selection, so the emitted tokens are biased (towards the drafter's favourites). Use [`walk`]
/// with per-node samples for lossless sampling; this mode exists to compare with the reference.
///
/// `target_prob`, `draft_prob` and `uniforms` are per (beam, depth), `[M*(C−1)]` at
/// `i*(C−1) + k`; `verdict` is per packed node, `[L]`.
///
/// # Errors
/// [`Error::InvalidConfig`] for wrong lengths.
pub fn reference_parity(
    tree: &DraftTree,
    target_prob: &[f32],
    draft_prob: &[f32],
    uniforms: &[f32],
    verdict: &[u32],
) -> Result<Accepted> {
    let width = tree.beam_width();
    let length = tree.beam_length();
    let steps = length - 1;
    let expected = width * steps;
    check_len(
        "target_prob",
        target_prob.len(),
        expected,
        "(beam, draft step)",
    )?;
    check_len(
        "draft_prob",
        draft_prob.len(),
        expected,
        "(beam, draft step)",
    )?;
    check_len("uniforms", uniforms.len(), expected, "(beam, draft step)")?;
    check_len("verdict", verdict.len(), tree.len(), "packed node")?;

    let (mut best_beam, mut best_n) = (0usize, 0usize);
    for i in 0..width {
        let range = i * steps..(i + 1) * steps;
        // `u < p / q` as the reference writes it: q = 0 < p accepts (p/q = inf), p = q = 0 and
        // NaN reject.
        let n = target_prob[range.clone()]
            .iter()
            .zip(&draft_prob[range.clone()])
            .zip(&uniforms[range])
            .take_while(|((p, q), u)| **u < **p / **q)
            .count();
        if n > best_n {
            best_n = n;
            best_beam = i;
        }
    }
    let row = &tree.unpacker()[best_beam * length..best_beam * length + best_n + 1];
    let last = row[best_n];
    Ok(Accepted {
        path: row.to_vec(),
        bonus: verdict[last],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rustfmt::skip]
    const BEAMS: [u32; 20] = [
        9, 1, 2, 3,
        9, 1, 2, 4,
        9, 5, 2, 3,
        9, 1, 2, 3,
        9, 1, 6, 3,
    ];
    // Packed: 0:9 1:1 2:2 3:3 4:4 5:5 6:2 7:3 8:6 9:3 (see tree.rs tests).

    fn tree() -> DraftTree {
        DraftTree::pack(&BEAMS, 5, 4).unwrap()
    }

    #[test]
    fn walk_follows_verdicts() {
        let t = tree();
        // Root says 1, node 1 says 6, node 8 says 7 (no such child) -> stop at 8, bonus 7.
        let mut verdict = vec![0u32; 10];
        verdict[0] = 1;
        verdict[1] = 6;
        verdict[8] = 7;
        let a = walk(&t, &verdict).unwrap();
        assert_eq!(a.path, vec![0, 1, 8]);
        assert_eq!(a.bonus, 7);
        assert_eq!(a.drafted(), 2);
        assert_eq!(a.emitted(&t), vec![1, 6, 7]);

        // Nothing matches at the root.
        let a = walk(&t, &[42; 10]).unwrap();
        assert_eq!(a.path, vec![0]);
        assert_eq!(a.bonus, 42);

        // A full beam, then the leaf's verdict.
        let verdict = [5, 0, 0, 0, 0, 2, 3, 11, 0, 0];
        let a = walk(&t, &verdict).unwrap();
        assert_eq!(a.path, vec![0, 5, 6, 7]);
        assert_eq!(a.bonus, 11);

        assert!(matches!(walk(&t, &[0; 9]), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn typical_picks_longest_then_first() {
        let t = tree();
        let entropy = [0.0f32; 10];
        // Threshold min(0.3, 1.0 * e^0) = 0.3.
        let mut prob = [0.0f32; 10];
        // Acceptable: 1 (0.5), 2 (0.4), 8 (0.9), 9 (0.9), 5 (0.8), 6 (0.8); not 3, 4, 7.
        for (n, p) in [(1, 0.5), (2, 0.4), (8, 0.9), (9, 0.9), (5, 0.8), (6, 0.8)] {
            prob[n] = p;
        }
        let verdict: Vec<u32> = (100..110).collect();
        let a = typical(&t, &prob, &entropy, &verdict, 0.3, 1.0).unwrap();
        assert_eq!(a.path, vec![0, 1, 8, 9]);
        assert_eq!(a.bonus, 109);

        // Make 9 unacceptable: depth-2 ties between 2, 6 and 8 -> first in packing order is 2.
        prob[9] = 0.1;
        let a = typical(&t, &prob, &entropy, &verdict, 0.3, 1.0).unwrap();
        assert_eq!(a.path, vec![0, 1, 2]);

        // An acceptable child under an unacceptable parent does not count.
        prob[1] = 0.0;
        let a = typical(&t, &prob, &entropy, &verdict, 0.3, 1.0).unwrap();
        assert_eq!(a.path, vec![0, 5, 6]);

        // High entropy lowers the threshold to delta * exp(-H).
        let high = [5.0f32; 10];
        let a = typical(&t, &[0.01; 10], &high, &verdict, 0.3, 1.0).unwrap();
        assert_eq!(a.path, vec![0, 1, 2, 3]);

        assert!(matches!(
            typical(&t, &prob, &entropy, &verdict, f32::NAN, 1.0),
            Err(Error::InvalidSettings(_))
        ));
        assert!(matches!(
            typical(&t, &prob[..9], &entropy, &verdict, 0.3, 1.0),
            Err(Error::InvalidConfig(_))
        ));
    }

    #[test]
    fn reference_parity_counts_per_beam() {
        let t = tree();
        let steps = 3;
        let p = vec![0.5f32; 5 * steps];
        let q = vec![1.0f32; 5 * steps];
        // Accept iff u < 0.5.
        #[rustfmt::skip]
        let u = vec![
            0.9, 0.0, 0.0, // beam 0: 0
            0.1, 0.1, 0.9, // beam 1: 2
            0.1, 0.9, 0.0, // beam 2: 1
            0.1, 0.1, 0.9, // beam 3: 2 (tie with 1, later)
            0.1, 0.1, 0.1, // beam 4: 3
        ];
        let verdict: Vec<u32> = (100..110).collect();
        let a = reference_parity(&t, &p, &q, &u, &verdict).unwrap();
        assert_eq!(a.path, vec![0, 1, 8, 9]);
        assert_eq!(a.bonus, 109);

        let mut u2 = u.clone();
        u2[12..15].copy_from_slice(&[0.9, 0.0, 0.0]);
        let a = reference_parity(&t, &p, &q, &u2, &verdict).unwrap();
        assert_eq!(a.path, vec![0, 1, 2]);
        assert_eq!(a.bonus, 102);

        // q = 0 < p accepts; p = q = 0 rejects.
        let a = reference_parity(&t, &[1.0; 15], &[0.0; 15], &[0.5; 15], &verdict).unwrap();
        assert_eq!(a.drafted(), 3);
        let a = reference_parity(&t, &[0.0; 15], &[0.0; 15], &[0.5; 15], &verdict).unwrap();
        assert_eq!(a.path, vec![0]);
        assert_eq!(a.bonus, 100);

        assert!(matches!(
            reference_parity(&t, &p, &q, &u[..14], &verdict),
            Err(Error::InvalidConfig(_))
        ));
    }

    #[test]
    fn single_token_beams() {
        let t = DraftTree::pack(&[4, 4], 2, 1).unwrap();
        assert_eq!(walk(&t, &[3]).unwrap().path, vec![0]);
        let a = reference_parity(&t, &[], &[], &[], &[3]).unwrap();
        assert_eq!((a.path, a.bonus), (vec![0], 3));
        let a = typical(&t, &[0.0], &[0.0], &[3], 0.1, 0.1).unwrap();
        assert_eq!((a.path, a.bonus), (vec![0], 3));
    }
}
