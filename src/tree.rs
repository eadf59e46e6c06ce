//! Dynamic tree attention (SPEC.md §3): pack the drafter's beams into their unique-prefix tree.
//!
//! The M beams of one round all start with the same token `g0` and often share further prefixes.
//! Verifying each beam separately would run the target on M·C tokens; the tree holds every distinct
//! prefix once, so the target runs on `L ≤ 1 + M(C−1)` tokens with a mask that lets each token see
//! exactly its ancestors.
//!
//! Everything here is plain host-side integer work on slices: the decoder reads the beams back from
//! the device once per round, packs them here (a few microseconds), and uploads tokens, positions and
//! masks built from the [`PackedBatch`].
//!
//! # Packing order
//!
//! The order of packed tokens is observable (acceptance breaks ties by the first beam, i.e. the
//! first node in packing order), so it follows SPEC.md §3 exactly:
//!
//! * `tree[i,k]` is the smallest beam index `j` whose tokens `0..=k` equal beam `i`'s;
//! * beam `i` keeps the depths `k` with `tree[i,k] == i` (always a suffix of the beam);
//! * kept tokens are laid out in row-major `(beam, depth)` order;
//! * `unpacker[i,k] = seg_start[tree[i,k]] + offset`, so `packed[unpacker] == beams`.
//!
//! [`DraftTree::pack`] computes the same thing as a trie insertion in beam order: beam `i` walks
//! down the nodes created by beams `0..i` while its prefix exists, then creates one node per
//! remaining depth. The node a beam finds at depth `k` was created by the smallest beam sharing
//! that prefix (beams are inserted in increasing order), which is `tree[i,k]`, and the nodes
//! created by beam `i` are appended consecutively, which is the row-major order of `keep`.
//! Children are found through a `(parent, token)` hash table, so packing costs `O(M·C)` expected
//! instead of the `O(M²·C)` pairwise comparison (measured: 2–5 µs for M = 64, C = 5 on the 2-core
//! development machine). Parents are always created before their children, so `parent(n) < n`.

use crate::{Error, Result};

/// Marks the end of a beam shorter than the tree's beam length: every position from a beam's
/// first `BEAM_END` on adds no node and unpacks to the beam's last real node. It is never a
/// vocabulary token, so such a position is never accepted. (The decoder pads a drafted beam with
/// it when the tree is deeper than the beam and the beam's text is not known on the host yet.)
pub const BEAM_END: u32 = u32::MAX;

/// The unique-prefix tree of one batch row's beams.
///
/// Node 0 is the root (`g0`, depth 0). Every other node is a distinct prefix of at least one beam;
/// its token is the prefix's last token and its depth is the prefix length minus one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftTree {
    beam_width: usize,
    beam_length: usize,
    tokens: Vec<u32>,
    depths: Vec<usize>,
    /// `parents[0]` is unused (the root has none); `parents[n] < n` otherwise.
    parents: Vec<usize>,
    /// Smallest beam index whose prefix is this node (`tree[i,k]` of SPEC §3).
    owners: Vec<usize>,
    /// Children in compressed-row form: children of `n` are `child_list[child_start[n]..child_start[n+1]]`.
    child_start: Vec<usize>,
    child_list: Vec<usize>,
    unpacker: Vec<usize>,
}

impl DraftTree {
    /// Packs one batch row's beams.
    ///
    /// `beams` is row-major `[beam_width * beam_length]`: beam `i` is
    /// `beams[i * beam_length..(i + 1) * beam_length]`, and every beam must start with the same
    /// token `g0` (the token the target itself chose last round).
    ///
    /// A beam may end early with [`BEAM_END`] (then only `BEAM_END` up to its length).
    ///
    /// # Errors
    /// [`Error::InvalidSettings`] if a size is zero, `beams` has the wrong length, the tree would
    /// not fit `u32` indices, the beams do not share their first token, or a beam starts with
    /// [`BEAM_END`] or has a token after it.
    pub fn pack(beams: &[u32], beam_width: usize, beam_length: usize) -> Result<Self> {
        if beam_width == 0 || beam_length == 0 {
            return Err(Error::InvalidSettings(format!(
                "beam width and length must be positive, got {beam_width} x {beam_length}"
            )));
        }
        let expected = beam_width.checked_mul(beam_length).ok_or_else(|| {
            Error::InvalidSettings(format!(
                "beam width {beam_width} x beam length {beam_length} overflows"
            ))
        })?;
        if beams.len() != expected {
            return Err(Error::InvalidSettings(format!(
                "expected {expected} beam tokens ({beam_width} beams x {beam_length}), got {}",
                beams.len()
            )));
        }
        // The child table stores node ids as u32 to stay small; no realistic tree comes close.
        if expected >= u32::MAX as usize {
            return Err(Error::InvalidSettings(format!(
                "{expected} beam tokens exceed the supported tree size"
            )));
        }
        let g0 = beams[0];
        if let Some(i) = (1..beam_width).find(|&i| beams[i * beam_length] != g0) {
            return Err(Error::InvalidSettings(format!(
                "all beams must start with the same token: beam 0 starts with {g0}, beam {i} with {}",
                beams[i * beam_length]
            )));
        }
        for (i, beam) in beams.chunks_exact(beam_length).enumerate() {
            if let Some(end) = beam.iter().position(|&t| t == BEAM_END)
                && (end == 0 || beam[end..].iter().any(|&t| t != BEAM_END))
            {
                return Err(Error::InvalidSettings(format!(
                    "beam {i} ends at position {end}: a beam must keep its first token and \
                     hold nothing after its end"
                )));
            }
        }

        let capacity = 1 + beam_width * (beam_length - 1);
        let mut tokens = Vec::with_capacity(capacity);
        let mut depths = Vec::with_capacity(capacity);
        let mut parents = Vec::with_capacity(capacity);
        let mut owners = Vec::with_capacity(capacity);
        let mut unpacker = vec![0usize; expected];
        let mut children = ChildTable::new(capacity);

        tokens.push(g0);
        depths.push(0);
        parents.push(0);
        owners.push(0);

        for (i, beam) in beams.chunks_exact(beam_length).enumerate() {
            let (done, rest) = unpacker.split_at_mut(i * beam_length);
            let row = &mut rest[..beam_length];
            // A prefix shared with the previous beam maps to the same nodes (one node per distinct
            // prefix), so copy them instead of looking them up: beam search emits beams sorted by
            // score, and neighbours often share long prefixes.
            let mut k = 1;
            if i > 0 {
                let prev_beam = &beams[(i - 1) * beam_length..i * beam_length];
                let prev_row = &done[(i - 1) * beam_length..];
                while k < beam_length && beam[k] == prev_beam[k] {
                    row[k] = prev_row[k];
                    k += 1;
                }
            }
            let mut node = row[k - 1];
            // Follow the prefix that other earlier beams already created...
            while k < beam_length && beam[k] != BEAM_END {
                match children.get(node, beam[k], &parents, &tokens) {
                    Some(child) => {
                        node = child;
                        row[k] = node;
                        k += 1;
                    }
                    None => break,
                }
            }
            // ...then this beam is the first (smallest index) with each longer prefix: it owns
            // the remaining depths, appended in (beam, depth) order. A fresh node has no
            // children, so no further lookups are needed.
            for (k, &token) in beam.iter().enumerate().skip(k) {
                if token == BEAM_END {
                    // The beam has ended: its remaining positions stay on its last node.
                    row[k..].fill(node);
                    break;
                }
                let n = tokens.len();
                tokens.push(token);
                depths.push(k);
                parents.push(node);
                owners.push(i);
                children.insert(node, token, n);
                node = n;
                row[k] = node;
            }
        }

        // Compressed child lists in packing (= increasing index) order: count per parent into
        // `child_start[p + 2]`, prefix-sum, then use `child_start[p + 1]` as the write cursor,
        // which leaves it at the end of `p`'s children = the start of `p + 1`'s.
        let len = tokens.len();
        let mut child_start = vec![0usize; len + 2];
        for &p in &parents[1..] {
            child_start[p + 2] += 1;
        }
        for n in 2..len + 2 {
            child_start[n] += child_start[n - 1];
        }
        let mut child_list = vec![0usize; len - 1];
        for (n, &p) in parents.iter().enumerate().skip(1) {
            child_list[child_start[p + 1]] = n;
            child_start[p + 1] += 1;
        }
        child_start.truncate(len + 1);

        tracing::trace!(
            beam_width,
            beam_length,
            packed = len,
            unpacked = expected,
            "packed draft tree"
        );
        Ok(Self {
            beam_width,
            beam_length,
            tokens,
            depths,
            parents,
            owners,
            child_start,
            child_list,
            unpacker,
        })
    }

    /// Number of packed tokens `L` (at least 1: the root).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: a tree has at least its root. Present for the `len`/`is_empty` convention.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Packed token ids `[L]`; `tokens()[0]` is `g0`.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Depth of each packed token `[L]` (root 0); the token's position is `context length + depth`.
    pub fn depths(&self) -> &[usize] {
        &self.depths
    }

    /// The parent of `node`; `None` for the root and for out-of-range nodes.
    pub fn parent(&self, node: usize) -> Option<usize> {
        if node == 0 || node >= self.len() {
            None
        } else {
            Some(self.parents[node])
        }
    }

    /// Children of `node` as packed indices, in packing order (empty for leaves and out-of-range
    /// nodes). Their tokens are pairwise distinct.
    pub fn children(&self, node: usize) -> &[usize] {
        if node >= self.len() {
            return &[];
        }
        &self.child_list[self.child_start[node]..self.child_start[node + 1]]
    }

    /// The child of `node` carrying `token`, if any.
    pub fn child_with_token(&self, node: usize, token: u32) -> Option<usize> {
        self.children(node)
            .iter()
            .copied()
            .find(|&c| self.tokens[c] == token)
    }

    /// The smallest beam index whose prefix is `node` (`tree[i,k]` of SPEC §3); `None` out of range.
    pub fn owner(&self, node: usize) -> Option<usize> {
        self.owners.get(node).copied()
    }

    /// `[M*C]` packed index of (beam `i`, depth `k`) at `i*C + k`; `packed[unpacker] == beams`.
    pub fn unpacker(&self) -> &[usize] {
        &self.unpacker
    }

    /// Packed nodes from the root to `node`, both included (empty for an out-of-range node).
    pub fn path(&self, node: usize) -> Vec<usize> {
        if node >= self.len() {
            return Vec::new();
        }
        let mut path = vec![0usize; self.depths[node] + 1];
        let mut n = node;
        for slot in path.iter_mut().rev() {
            *slot = n;
            n = self.parents[n];
        }
        path
    }

    /// Beam width `M` the tree was packed from.
    pub fn beam_width(&self) -> usize {
        self.beam_width
    }

    /// Beam length `C` (including `g0`) the tree was packed from.
    pub fn beam_length(&self) -> usize {
        self.beam_length
    }

    /// Visibility inside the tree, `[L*L]` row-major: `mask[t*L + s]` is true iff `s` is `t` or an
    /// ancestor of `t`.
    pub fn ancestor_mask(&self) -> Vec<bool> {
        let len = self.len();
        let mut mask = vec![false; len * len];
        self.write_ancestor_mask(&mut mask, len);
        mask
    }

    /// Writes the ancestor mask into the top-left `L×L` block of a row-major `stride×stride`-or-wider
    /// buffer (`out[t*stride + s]`), leaving other entries untouched.
    fn write_ancestor_mask(&self, out: &mut [bool], stride: usize) {
        for t in 0..self.len() {
            let row = &mut out[t * stride..t * stride + stride];
            let mut s = t;
            // Walking parents costs O(depth) per row instead of O(L) for copying the parent's row.
            loop {
                row[s] = true;
                if s == 0 {
                    break;
                }
                s = self.parents[s];
            }
        }
    }
}

/// Open-addressing hash set of packed nodes keyed by `(parent, token)`, used while packing.
///
/// Looking a child up by scanning sibling lists costs O(siblings) dependent loads per step, which
/// dominates for wide trees (64 distinct depth-1 tokens: ~2000 pointer-chasing steps). A
/// mostly-empty linear-probing table keeps every lookup at about one probe whatever the shape.
/// Slots hold only node ids (4 bytes, so clearing the table per pack stays cheap); a node's key is
/// read back from the tree's own `parents` / `tokens`.
struct ChildTable {
    slots: Vec<u32>,
    shift: u32,
    mask: usize,
}

impl ChildTable {
    const EMPTY: u32 = u32::MAX;

    fn new(max_nodes: usize) -> Self {
        let size = (2 * max_nodes).next_power_of_two().max(16);
        Self {
            slots: vec![Self::EMPTY; size],
            shift: 64 - size.trailing_zeros(),
            mask: size - 1,
        }
    }

    /// First slot to probe: Fibonacci hashing spreads the combined key over the table.
    fn home(&self, parent: usize, token: u32) -> usize {
        let key = ((parent as u64) << 32) | u64::from(token);
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    fn get(&self, parent: usize, token: u32, parents: &[usize], tokens: &[u32]) -> Option<usize> {
        let mut slot = self.home(parent, token);
        loop {
            let node = self.slots[slot];
            if node == Self::EMPTY {
                return None;
            }
            let node = node as usize;
            if tokens[node] == token && parents[node] == parent {
                return Some(node);
            }
            slot = (slot + 1) & self.mask;
        }
    }

    /// Inserts a node whose key is known to be absent (the caller just created it).
    fn insert(&mut self, parent: usize, token: u32, node: usize) {
        let mut slot = self.home(parent, token);
        while self.slots[slot] != Self::EMPTY {
            slot = (slot + 1) & self.mask;
        }
        self.slots[slot] = node as u32;
    }
}

/// The trees of a batch, padded to one length `Lmax` for a single target forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedBatch {
    trees: Vec<DraftTree>,
    max_len: usize,
}

impl PackedBatch {
    /// Groups the trees of a batch (one per row).
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for an empty batch.
    pub fn new(trees: Vec<DraftTree>) -> Result<Self> {
        let max_len =
            trees.iter().map(DraftTree::len).max().ok_or_else(|| {
                Error::EmptyInput("a packed batch needs at least one tree".into())
            })?;
        Ok(Self { trees, max_len })
    }

    /// Padded tree length `Lmax`.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Batch size `B`.
    pub fn batch_size(&self) -> usize {
        self.trees.len()
    }

    /// The trees, one per batch row.
    pub fn trees(&self) -> &[DraftTree] {
        &self.trees
    }

    /// Consumes the batch, returning its trees.
    pub fn into_trees(self) -> Vec<DraftTree> {
        self.trees
    }

    /// Packed token ids `[B * Lmax]`, row-major, padded with `pad`.
    pub fn tokens(&self, pad: u32) -> Vec<i64> {
        let lmax = self.max_len;
        let mut out = vec![i64::from(pad); self.trees.len() * lmax];
        for (row, tree) in out.chunks_exact_mut(lmax).zip(&self.trees) {
            for (o, &t) in row.iter_mut().zip(tree.tokens()) {
                *o = i64::from(t);
            }
        }
        out
    }

    /// Absolute positions `[B * Lmax]`: row `b`'s token at depth `k` gets `starts[b] + k`, where
    /// `starts[b]` is the position of `g0` (that row's context length). Padding gets `starts[b]`,
    /// an in-range position whose result is discarded anyway.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `starts` does not have one entry per row.
    pub fn positions(&self, starts: &[usize]) -> Result<Vec<i64>> {
        if starts.len() != self.trees.len() {
            return Err(Error::InvalidConfig(format!(
                "positions need one start per batch row: {} rows, {} starts",
                self.trees.len(),
                starts.len()
            )));
        }
        let lmax = self.max_len;
        let mut out = vec![0i64; self.trees.len() * lmax];
        for ((row, tree), &start) in out.chunks_exact_mut(lmax).zip(&self.trees).zip(starts) {
            let start = start as i64;
            row.fill(start);
            for (o, &d) in row.iter_mut().zip(tree.depths()) {
                *o = start + d as i64;
            }
        }
        Ok(out)
    }

    /// Per row, the `[Lmax*Lmax]` in-tree mask (`mask[t*Lmax + s]`: may `t` attend to `s`):
    /// the ancestor mask for real tokens; a padding token sees only itself (so its softmax stays
    /// well defined), and no token sees padding.
    pub fn block_masks(&self) -> Vec<Vec<bool>> {
        let lmax = self.max_len;
        self.trees
            .iter()
            .map(|tree| {
                let mut mask = vec![false; lmax * lmax];
                Self::write_row_mask(tree, lmax, &mut mask);
                mask
            })
            .collect()
    }

    /// The same masks as [`block_masks`](Self::block_masks) in one `[B * Lmax * Lmax]` buffer,
    /// ready for a single upload.
    pub fn block_mask_flat(&self) -> Vec<bool> {
        let lmax = self.max_len;
        let mut out = vec![false; self.trees.len() * lmax * lmax];
        if lmax == 0 {
            return out;
        }
        for (mask, tree) in out.chunks_exact_mut(lmax * lmax).zip(&self.trees) {
            Self::write_row_mask(tree, lmax, mask);
        }
        out
    }

    /// Fills one row's zeroed `[Lmax*Lmax]` mask.
    fn write_row_mask(tree: &DraftTree, lmax: usize, mask: &mut [bool]) {
        tree.write_ancestor_mask(mask, lmax);
        for p in tree.len()..lmax {
            mask[p * lmax + p] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            DraftTree::pack(&[], 0, 3),
            Err(Error::InvalidSettings(_))
        ));
        assert!(matches!(
            DraftTree::pack(&[1, 2], 1, 0),
            Err(Error::InvalidSettings(_))
        ));
        assert!(matches!(
            DraftTree::pack(&[1, 2, 3], 2, 2),
            Err(Error::InvalidSettings(_))
        ));
        assert!(matches!(
            DraftTree::pack(&[1, 2, 3, 4], 2, 2),
            Err(Error::InvalidSettings(_))
        ));
        assert!(matches!(
            PackedBatch::new(Vec::new()),
            Err(Error::EmptyInput(_))
        ));
    }

    #[test]
    fn a_beam_that_ends_early_adds_no_nodes_past_its_end() {
        const E: u32 = BEAM_END;
        // Beam 0 ends after two tokens; beam 1 shares its first drafted token and goes on.
        let tree = DraftTree::pack(&[5, 8, E, E, 5, 8, 2, 3], 2, 4).unwrap();
        assert_eq!(tree.tokens(), &[5, 8, 2, 3]);
        assert_eq!(tree.depths(), &[0, 1, 2, 3]);
        assert_eq!(tree.unpacker(), &[0, 1, 1, 1, 0, 1, 2, 3]);
        // Two beams ending at the same place share every node.
        let tree = DraftTree::pack(&[5, 8, E, 5, 8, E], 2, 3).unwrap();
        assert_eq!(tree.tokens(), &[5, 8]);
        assert_eq!(tree.unpacker(), &[0, 1, 1, 0, 1, 1]);
        // A beam may not start with the end, nor go on after it.
        for bad in [[E, 8, 2], [5, E, 2]] {
            assert!(matches!(
                DraftTree::pack(&bad, 1, 3),
                Err(Error::InvalidSettings(_))
            ));
        }
    }

    #[test]
    fn single_token_beams_collapse_to_the_root() {
        let tree = DraftTree::pack(&[7, 7, 7], 3, 1).unwrap();
        assert_eq!(tree.len(), 1);
        assert_eq!(tree.tokens(), &[7]);
        assert_eq!(tree.unpacker(), &[0, 0, 0]);
        assert_eq!(tree.ancestor_mask(), vec![true]);
        assert!(tree.children(0).is_empty());
        assert_eq!(tree.parent(0), None);
    }

    #[test]
    fn known_small_tree() {
        // Beams (g0 = 9):       packed (row-major over kept (beam, depth)):
        //   0: 9 1 2 3          0:9  1:1(d1)  2:2(d2)  3:3(d3)
        //   1: 9 1 2 4          4:4(d3, child of 2)
        //   2: 9 5 2 3          5:5(d1)  6:2(d2)  7:3(d3)
        //   3: 9 1 2 3          (duplicate of beam 0: nothing kept)
        //   4: 9 1 6 3          8:6(d2, child of 1)  9:3(d3)
        #[rustfmt::skip]
        let beams = [
            9, 1, 2, 3,
            9, 1, 2, 4,
            9, 5, 2, 3,
            9, 1, 2, 3,
            9, 1, 6, 3,
        ];
        let tree = DraftTree::pack(&beams, 5, 4).unwrap();
        assert_eq!(tree.len(), 10);
        assert_eq!(tree.tokens(), &[9, 1, 2, 3, 4, 5, 2, 3, 6, 3]);
        assert_eq!(tree.depths(), &[0, 1, 2, 3, 3, 1, 2, 3, 2, 3]);
        #[rustfmt::skip]
        assert_eq!(tree.unpacker(), &[
            0, 1, 2, 3,
            0, 1, 2, 4,
            0, 5, 6, 7,
            0, 1, 2, 3,
            0, 1, 8, 9,
        ]);
        assert_eq!(tree.children(0), &[1, 5]);
        assert_eq!(tree.children(1), &[2, 8]);
        assert_eq!(tree.children(2), &[3, 4]);
        assert_eq!(tree.children(3), &[] as &[usize]);
        assert_eq!(tree.parent(8), Some(1));
        assert_eq!(tree.path(9), vec![0, 1, 8, 9]);
        assert_eq!(tree.owner(4), Some(1));
        assert_eq!(tree.owner(9), Some(4));
        assert_eq!(tree.child_with_token(1, 6), Some(8));
        assert_eq!(tree.child_with_token(1, 7), None);
        let mask = tree.ancestor_mask();
        let visible = |t: usize| (0..10).filter(|&s| mask[t * 10 + s]).collect::<Vec<_>>();
        assert_eq!(visible(4), vec![0, 1, 2, 4]);
        assert_eq!(visible(7), vec![0, 5, 6, 7]);
        assert_eq!(visible(0), vec![0]);
    }

    #[test]
    fn identical_beams_pack_to_one_chain() {
        let beams = [3, 1, 4, 1, 3, 1, 4, 1, 3, 1, 4, 1];
        let tree = DraftTree::pack(&beams, 3, 4).unwrap();
        assert_eq!(tree.len(), 4);
        assert_eq!(tree.unpacker(), &[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn disjoint_beams_reach_the_bound() {
        // M beams differing at depth 1 share only g0: L = 1 + M(C-1).
        let beams = [0, 1, 1, 0, 2, 2, 0, 3, 3];
        let tree = DraftTree::pack(&beams, 3, 3).unwrap();
        assert_eq!(tree.len(), 7);
        assert_eq!(tree.tokens(), &[0, 1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn batch_padding() {
        let a = DraftTree::pack(&[5, 1, 2, 5, 3, 4], 2, 3).unwrap(); // L = 5
        let b = DraftTree::pack(&[8, 1, 2, 8, 1, 2], 2, 3).unwrap(); // L = 3
        let batch = PackedBatch::new(vec![a, b]).unwrap();
        assert_eq!(batch.max_len(), 5);
        assert_eq!(batch.tokens(0), vec![5, 1, 2, 3, 4, 8, 1, 2, 0, 0]);
        assert_eq!(
            batch.positions(&[10, 20]).unwrap(),
            vec![10, 11, 12, 11, 12, 20, 21, 22, 20, 20]
        );
        assert!(matches!(
            batch.positions(&[1]),
            Err(Error::InvalidConfig(_))
        ));
        let masks = batch.block_masks();
        let m = &masks[1];
        let visible = |t: usize| (0..5).filter(|&s| m[t * 5 + s]).collect::<Vec<_>>();
        assert_eq!(visible(2), vec![0, 1, 2]);
        assert_eq!(visible(3), vec![3]);
        assert_eq!(visible(4), vec![4]);
        assert_eq!(batch.block_mask_flat(), masks.concat());
    }
}
