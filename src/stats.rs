//! Generation statistics: throughput, τ, acceptance per depth and where the time went.

use std::time::Duration;

use serde::Serialize;

/// What a generation call did and how long each part took.
///
/// Phases are timed on the host. On synchronous backends (the CPU ones) that is the real cost of
/// each phase. On asynchronous backends (CUDA, WGPU) the host only enqueues work and waits at the
/// round's single readback, so `draft` and `verify` then measure launch overhead and
/// `readback` absorbs the device time still outstanding.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Tokens emitted (all rows), the prefill's first token included.
    pub new_tokens: usize,
    /// Target forwards after the prefill (one per decoding step or speculative round).
    pub target_forwards: usize,
    /// Tokens produced by those forwards (accepted drafts plus the bonus token), all rows.
    pub forward_tokens: usize,
    /// Speculative rounds, counted per batch row (equal to `target_forwards` at batch 1).
    pub row_rounds: usize,
    /// `accepted_at_depth[d]`: row-rounds in which at least `d + 1` drafted tokens were accepted.
    pub accepted_at_depth: Vec<usize>,
    /// Row-rounds whose accepted path was a prompt-lookup beam that beat every drafted beam.
    pub lookup_rounds: usize,
    /// Packed tree tokens verified, summed over row-rounds (shows how much prefix sharing saved).
    pub packed_tokens: usize,
    /// Host↔device synchronisations (readbacks).
    pub syncs: usize,
    pub prefill_time: Duration,
    pub draft_time: Duration,
    pub tree_time: Duration,
    pub verify_time: Duration,
    pub accept_time: Duration,
    /// Time spent waiting for the round's readback.
    pub readback_time: Duration,
    pub total_time: Duration,
}

impl Stats {
    /// τ: tokens per target forward per row, bonus token included.
    pub fn tau(&self) -> f64 {
        if self.row_rounds == 0 {
            0.0
        } else {
            self.forward_tokens as f64 / self.row_rounds as f64
        }
    }

    /// Emitted tokens per second of wall time, prefill included.
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.total_time.as_secs_f64();
        if secs > 0.0 {
            self.new_tokens as f64 / secs
        } else {
            0.0
        }
    }

    /// Emitted tokens per second of decoding, prefill excluded.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let secs = (self.total_time.saturating_sub(self.prefill_time)).as_secs_f64();
        if secs > 0.0 {
            self.new_tokens.saturating_sub(1) as f64 / secs
        } else {
            0.0
        }
    }

    /// Fraction of row-rounds that accepted at least `d + 1` drafted tokens, per depth.
    pub fn acceptance_rate_per_depth(&self) -> Vec<f64> {
        self.accepted_at_depth
            .iter()
            .map(|&c| {
                if self.row_rounds == 0 {
                    0.0
                } else {
                    c as f64 / self.row_rounds as f64
                }
            })
            .collect()
    }

    /// Adds another run's counters and times into this one.
    pub fn merge(&mut self, other: &Stats) {
        self.new_tokens += other.new_tokens;
        self.target_forwards += other.target_forwards;
        self.forward_tokens += other.forward_tokens;
        self.row_rounds += other.row_rounds;
        if self.accepted_at_depth.len() < other.accepted_at_depth.len() {
            self.accepted_at_depth
                .resize(other.accepted_at_depth.len(), 0);
        }
        for (a, b) in self
            .accepted_at_depth
            .iter_mut()
            .zip(&other.accepted_at_depth)
        {
            *a += b;
        }
        self.lookup_rounds += other.lookup_rounds;
        self.packed_tokens += other.packed_tokens;
        self.syncs += other.syncs;
        self.prefill_time += other.prefill_time;
        self.draft_time += other.draft_time;
        self.tree_time += other.tree_time;
        self.verify_time += other.verify_time;
        self.accept_time += other.accept_time;
        self.readback_time += other.readback_time;
        self.total_time += other.total_time;
    }
}
