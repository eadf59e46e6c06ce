//! Backend selection shared by the examples: `--backend cpu | cuda | wgpu` picks the Burn backend
//! type a generic `run::<B>(args, device)` is instantiated with.

/// Calls `$run::<B>($args, device)` for the backend named by `$name` (`cpu`, `cuda`, `wgpu`), or
/// fails with an error naming a backend this build was compiled without.
macro_rules! run_on_backend {
    ($name:expr, $run:ident, $args:expr) => {{
        use redrafter::backend::BackendKind;
        let kind: BackendKind = $name.parse()?;
        match kind.ensure_compiled()? {
            #[cfg(any(feature = "flex", feature = "ndarray"))]
            BackendKind::Cpu => $run::<redrafter::backend::Cpu>($args, Default::default()),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => $run::<redrafter::backend::Cuda>($args, Default::default()),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => {
                $run::<redrafter::backend::Wgpu>($args, redrafter::backend::wgpu_device()?)
            }
            #[allow(unreachable_patterns)]
            other => anyhow::bail!("backend {other:?} is not compiled in"),
        }
    }};
}
pub(crate) use run_on_backend;

/// Logs to stderr, filtered by `RUST_LOG`.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
}
