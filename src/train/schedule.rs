//! Learning-rate schedule of the recipe (SPEC §6): linear warmup, then cosine decay to zero.
//!
//! A pure function of the step, so a resumed run continues on exactly the same curve.

use serde::{Deserialize, Serialize};

/// Linear warmup over `warmup_steps`, then a half cosine from `peak` down to `min` at
/// `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub min: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// The recipe's schedule: `warmup_fraction` of `total_steps` warming up, decay to 0.
    pub fn cosine_with_warmup(peak: f64, warmup_fraction: f64, total_steps: usize) -> Self {
        let mut warmup_steps =
            (total_steps as f64 * warmup_fraction.clamp(0.0, 1.0)).round() as usize;
        // Short runs still warm up for a step: Adam's first update moves every weight by about
        // the full learning rate, which can overshoot on large hidden states.
        if warmup_fraction > 0.0 && total_steps > 1 {
            warmup_steps = warmup_steps.max(1);
        }
        Self {
            peak,
            min: 0.0,
            warmup_steps,
            total_steps,
        }
    }

    /// Learning rate of optimiser step `step` (0-based). Warmup starts at `peak / warmup` rather
    /// than 0, so the first step already learns.
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay as f64).min(1.0);
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine() {
        let s = LrSchedule::cosine_with_warmup(1e-3, 0.1, 100);
        assert_eq!(s.warmup_steps, 10);
        assert!((s.at(0) - 1e-4).abs() < 1e-12);
        assert!((s.at(9) - 1e-3).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12);
        assert!((s.at(55) - 5e-4).abs() < 1e-12);
        assert!(s.at(99) < 1e-6 && s.at(99) > 0.0);
        assert!(s.at(200) == 0.0);
        for step in 10..99 {
            assert!(s.at(step + 1) <= s.at(step));
        }
        assert_eq!(LrSchedule::cosine_with_warmup(1.0, 0.1, 4).warmup_steps, 1);
        // No warmup at all.
        assert_eq!(LrSchedule::cosine_with_warmup(1.0, 0.0, 10).at(0), 1.0);
    }
}
