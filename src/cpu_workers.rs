//! Where a decoding loop runs on the CPU: on a worker thread of rayon's pool, not beside it.
//!
//! The CPU kernels ([`crate::panel_matmul`], [`crate::cpu_kernels`]) and Flex's own ops split
//! their work over rayon's global pool. Called from a thread outside the pool (an application's
//! main thread), each parallel op is handed to the pool while the caller sleeps, and between ops
//! the pool's workers spin and yield, looking for work, while the caller runs the serial steps —
//! one thread more than there are cores. On the 2-core development machine that contention cost
//! plain decoding 4–10 % and a speculative round 8–12 % (docs/benchmarks.md, session 42). Run
//! from a worker, the loop's thread is one of the pool's: it takes its share of each parallel op
//! itself, and a spinning worker only ever waits on a core of its own.

use burn::tensor::backend::Backend;

/// Runs `work` on a worker of rayon's global pool (the calling thread waits) when `B` is the
/// Flex backend and the caller is not already a worker of some pool; elsewhere — the GPU
/// backends, whose streams belong to the thread that queues them — on the calling thread.
// Without Flex compiled in, `B` only keeps the call sites the same.
#[cfg_attr(not(feature = "flex"), allow(clippy::extra_unused_type_parameters))]
pub(crate) fn on_cpu_workers<B: Backend, R: Send>(work: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "flex")]
    if crate::flex_tensor::is_flex::<B>() && rayon::current_thread_index().is_none() {
        // From outside the pool, `scope` queues its closure on the global pool and blocks until
        // a worker has run it.
        return rayon::scope(|_| work());
    }
    work()
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::backend::{Autodiff, Flex};

    use super::on_cpu_workers;

    #[test]
    fn flex_work_runs_on_a_pool_worker_and_returns_its_result() {
        assert!(
            rayon::current_thread_index().is_none(),
            "a test thread is not a worker"
        );
        let caller = std::thread::current().id();
        let (on_worker, thread, sum) = on_cpu_workers::<Flex, _>(|| {
            let sum: u64 = (0..1000u64).map(|i| i * i).sum();
            (
                rayon::current_thread_index().is_some(),
                std::thread::current().id(),
                sum,
            )
        });
        assert!(on_worker);
        assert_ne!(thread, caller);
        assert_eq!(sum, 332_833_500);
        // From a worker already, on that worker: no second hop.
        let (outer, inner) = on_cpu_workers::<Flex, _>(|| {
            let outer = std::thread::current().id();
            (
                outer,
                on_cpu_workers::<Flex, _>(|| std::thread::current().id()),
            )
        });
        assert_eq!(outer, inner);
    }

    #[test]
    fn other_backends_run_on_the_calling_thread() {
        // Autodiff records every op on the caller's graph; the GPU backends' streams belong to
        // the thread that queues them.
        let caller = std::thread::current().id();
        let thread = on_cpu_workers::<Autodiff<Flex>, _>(|| std::thread::current().id());
        assert_eq!(thread, caller);
    }
}
