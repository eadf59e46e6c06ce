//! Fitting a training run's step count to a wall-clock budget
//! ([`TrainConfig::time_budget_secs`](super::TrainConfig::time_budget_secs)).
//!
//! The pace of the first steps is a poor guide: they compile kernels for every new padded
//! shape, and on an H200 a run that sized itself after 20 steps finished in 174 s of a 270-s
//! budget (docs/benchmarks.md, session 14). So the plan is made after [`CALIBRATION_STEPS`] and
//! then revisited every [`REPLAN_EVERY`] steps until half the run is done, in both directions,
//! never above the step count the run was configured with.

/// Steps a budgeted run takes before it first fixes its step count; the pace is timed over the
/// last 15 of them (the first ones compile kernels).
pub const CALIBRATION_STEPS: usize = 20;
/// Steps left out of the pace: kernel compilation dominates them.
const WARM_UP_STEPS: usize = 5;
/// After calibrating, the pace is measured again every this many steps, while at most half of
/// the planned steps are done (later changes would bend the schedule's decay too much).
pub const REPLAN_EVERY: usize = 50;
/// A re-plan moving the end by at most this fraction is ignored: it would only jitter the
/// schedule.
const REPLAN_TOLERANCE: f64 = 0.02;
/// Share of the remaining time planned for steps; the rest is kept for evaluations and
/// checkpoints.
const STEP_SHARE: f64 = 0.9;

/// Plans how many steps fit in a time budget from the pace measured so far.
#[derive(Debug, Clone)]
pub(crate) struct StepBudget {
    budget_secs: f64,
    /// Step the run started from (0, or the resumed step).
    start_step: usize,
    /// The most steps the run may take: its configured count.
    max_steps: usize,
    /// Seconds into the run at which the warm-up steps were done.
    warm_at: Option<f64>,
}

impl StepBudget {
    pub(crate) fn new(budget_secs: f64, start_step: usize, max_steps: usize) -> Self {
        Self {
            budget_secs,
            start_step,
            max_steps,
            warm_at: None,
        }
    }

    /// Called after every finished step: `steps_done` steps in all (the resumed ones included),
    /// `elapsed_secs` since the run started (hidden-state caching included), `total_steps` the
    /// current plan. Returns the new step count when the plan changes.
    ///
    /// The pace includes the evaluations and checkpoints that fell inside the timed window, so
    /// they are paid for in proportion; the [`STEP_SHARE`] margin covers the rest.
    pub(crate) fn after_step(
        &mut self,
        steps_done: usize,
        elapsed_secs: f64,
        total_steps: usize,
    ) -> Option<usize> {
        let done_here = steps_done.checked_sub(self.start_step)?;
        if done_here == WARM_UP_STEPS {
            self.warm_at = Some(elapsed_secs);
            return None;
        }
        let warm_at = self.warm_at?;
        let calibrating = done_here == CALIBRATION_STEPS;
        // "Half the run" counts this run's steps only: a run resumed late in its schedule
        // must still correct a calibration slowed by kernel compilation.
        let planned_here = total_steps.saturating_sub(self.start_step);
        let replanning = done_here > CALIBRATION_STEPS
            && (done_here - CALIBRATION_STEPS).is_multiple_of(REPLAN_EVERY)
            && 2 * done_here <= planned_here;
        if !(calibrating || replanning) {
            return None;
        }
        let pace = (elapsed_secs - warm_at) / (done_here - WARM_UP_STEPS) as f64;
        let left = STEP_SHARE * (self.budget_secs - elapsed_secs).max(0.0);
        let more = if pace > 0.0 {
            (left / pace).min(self.max_steps as f64) as usize
        } else {
            self.max_steps
        };
        let planned = (steps_done + more).min(self.max_steps);
        let moved = planned.abs_diff(total_steps) as f64;
        if planned == total_steps || (replanning && moved <= REPLAN_TOLERANCE * total_steps as f64)
        {
            return None;
        }
        Some(planned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `steps` steps of `pace` seconds each (after `setup` seconds of caching), applying
    /// every re-plan; returns the plans made.
    fn run(
        budget: &mut StepBudget,
        setup: f64,
        paces: impl Fn(usize) -> f64,
        total: &mut usize,
    ) -> Vec<usize> {
        let mut plans = Vec::new();
        let mut elapsed = setup;
        let mut done = budget.start_step;
        while done < *total {
            elapsed += paces(done);
            done += 1;
            if let Some(planned) = budget.after_step(done, elapsed, *total) {
                plans.push(planned);
                *total = planned;
            }
        }
        plans
    }

    #[test]
    fn a_steady_pace_is_planned_at_calibration_and_nudged_once() {
        // 100 s, 10 s of caching, 0.25 s per step: 20 steps by 15 s, then 0.9·85/0.25 = 306
        // more. The margin is a tenth of the time left, so it shrinks as the run goes on: by
        // step 120 ten more steps fit (0.9·60/0.25 = 216 more), and the run ends at 94 s.
        let mut budget = StepBudget::new(100.0, 0, 10_000);
        let mut total = 10_000;
        let plans = run(&mut budget, 10.0, |_| 0.25, &mut total);
        assert_eq!(plans, vec![326, 336]);
    }

    #[test]
    fn slow_first_steps_are_made_up_for_later() {
        // Steps 1-20 take 0.3 s (compiling), the rest 0.1 s: the calibration plans too few,
        // the re-plans raise the count again, and the run still ends inside the budget.
        let mut budget = StepBudget::new(100.0, 0, 10_000);
        let mut total = 10_000;
        let pace = |s: usize| if s < 20 { 0.3 } else { 0.1 };
        let plans = run(&mut budget, 10.0, pace, &mut total);
        assert!(plans.len() >= 2, "{plans:?}");
        assert!(plans[0] < 300, "{plans:?}");
        assert!(total > 700, "{plans:?}");
        let spent = 10.0 + (0..total).map(pace).sum::<f64>();
        assert!(spent < 100.0, "{spent} s for {plans:?}");
        // Never above the configured count.
        let mut budget = StepBudget::new(100.0, 0, 400);
        let mut total = 400;
        let plans = run(&mut budget, 10.0, pace, &mut total);
        assert_eq!(plans.last(), Some(&400), "{plans:?}");
        assert!(plans.iter().all(|&p| p <= 400));
    }

    #[test]
    fn a_budget_already_spent_ends_the_run_at_calibration() {
        let mut budget = StepBudget::new(1e-3, 0, 10_000);
        let mut total = 10_000;
        let plans = run(&mut budget, 0.0, |_| 0.1, &mut total);
        assert_eq!(plans, vec![CALIBRATION_STEPS]);
        assert_eq!(total, CALIBRATION_STEPS);
    }

    #[test]
    fn a_resumed_run_times_its_own_steps() {
        // Resumed at step 500 of 1,000: the 500 steps before are not part of the pace.
        let mut budget = StepBudget::new(30.0, 500, 1_000);
        assert_eq!(budget.after_step(503, 1.0, 1_000), None);
        assert_eq!(budget.after_step(505, 2.0, 1_000), None);
        // 15 steps in 3.75 s: 0.25 s each; 0.9·24.25/0.25 = 87.3 more.
        assert_eq!(budget.after_step(520, 5.75, 1_000), Some(607));
    }

    #[test]
    fn a_run_resumed_late_in_its_schedule_still_replans() {
        // On an H200 (session 15) a run resumed at step 3,600 of 5,000 calibrated on steps
        // slowed by kernel compilation, planned 381 more where ~1,300 fitted, and never looked
        // again: "half the run" was counted from step 0. Steps 1-20 of this run take 0.4 s,
        // the rest 0.1 s.
        let mut budget = StepBudget::new(250.0, 3_600, 5_000);
        let mut total = 5_000;
        let pace = |s: usize| if s < 3_620 { 0.4 } else { 0.1 };
        let plans = run(&mut budget, 20.0, pace, &mut total);
        assert!(plans.len() >= 2, "{plans:?}");
        assert!(total > 5_000 - 1_000 + 900, "{plans:?}");
        let spent = 20.0 + (3_600..total).map(pace).sum::<f64>();
        assert!(spent < 250.0, "{spent} s for {plans:?}");
    }

    #[test]
    fn small_moves_and_late_moves_are_ignored() {
        let mut budget = StepBudget::new(100.0, 0, 10_000);
        assert_eq!(budget.after_step(5, 10.0, 10_000), None);
        // Calibration: 15 steps in 3.75 s, 0.25 s each → 0.9·86.25/0.25 = 310.5 more.
        assert_eq!(budget.after_step(20, 13.75, 10_000), Some(330));
        // 50 steps later at the same pace: 335 would fit, inside the tolerance.
        assert_eq!(budget.after_step(70, 26.25, 330), None);
        // Past half of the run no re-plan, however fast it went.
        assert_eq!(budget.after_step(170, 30.0, 330), None);
    }
}
