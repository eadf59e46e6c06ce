//! The vector instruction sets the CPU kernels are compiled for, and which one this CPU runs.
//!
//! [`crate::panel_matmul`], [`crate::skinny_matmul`] and the CPU attention each ship an AVX-512,
//! an AVX2 + FMA and a portable variant of their loops; [`Simd::detect`] picks the widest the CPU
//! has — or the widest up to the one [`SIMD_VARIABLE`] names, to see what a CPU without AVX-512
//! (or without AVX2) would run. The panel product and the attention compute the same bits in
//! every variant; the skinny kernel's lane count sets its summation order, so one process always
//! takes the same variant.

/// The environment variable that caps the instruction set the CPU kernels use (`avx512`, `avx2`
/// or `portable`; read once per process). Unset, or naming a set this CPU lacks, the widest
/// the CPU has is used.
pub const SIMD_VARIABLE: &str = "REDRAFTER_SIMD";

/// An instruction set the kernels have a variant for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    /// AVX-512F (with AVX2 and FMA): 32 vector registers of 16 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2, FMA and F16C (every CPU with the first two has the third): 16 vector registers of
    /// 8 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain Rust, vectorised as the compiler sees fit.
    Portable,
}

impl Simd {
    /// The widest variant this CPU runs, capped by [`SIMD_VARIABLE`]. Read once.
    pub(crate) fn detect() -> Self {
        static CHOSEN: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let cap = std::env::var(SIMD_VARIABLE).ok();
            let chosen = Self::capped(&Self::available(), cap.as_deref());
            tracing::debug!(?chosen, ?cap, "CPU kernels' instruction set");
            chosen
        })
    }

    /// The widest of `available` (narrowest first) that is no wider than the variant `cap`
    /// names; the widest of all when `cap` is `None` or names none of them.
    fn capped(available: &[Self], cap: Option<&str>) -> Self {
        let widest = *available.last().unwrap_or(&Self::Portable);
        let Some(cap) = cap else {
            return widest;
        };
        let position = available
            .iter()
            .position(|simd| simd.name().eq_ignore_ascii_case(cap.trim()));
        match position {
            Some(at) => available[at],
            None => {
                tracing::warn!(
                    cap,
                    ?widest,
                    "{SIMD_VARIABLE} names no instruction set this CPU runs; using the widest"
                );
                widest
            }
        }
    }

    /// The name [`SIMD_VARIABLE`] takes for this variant.
    fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => "avx2",
            Self::Portable => "portable",
        }
    }

    /// Every variant this CPU runs, narrowest first (tests compare them all).
    pub(crate) fn available() -> Vec<Self> {
        let mut all = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                all.push(Self::Avx2);
                if std::arch::is_x86_feature_detected!("avx512f") {
                    all.push(Self::Avx512);
                }
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_picks_the_named_variant_or_the_widest() {
        let available = Simd::available();
        let widest = *available.last().unwrap();
        assert_eq!(Simd::capped(&available, None), widest);
        assert_eq!(Simd::capped(&available, Some("portable")), Simd::Portable);
        assert_eq!(Simd::capped(&available, Some(" Portable ")), Simd::Portable);
        assert_eq!(Simd::capped(&available, Some("sse9")), widest);
        for &simd in &available {
            assert_eq!(Simd::capped(&available, Some(simd.name())), simd);
        }
        // A set this CPU lacks: the widest it has.
        assert_eq!(
            Simd::capped(&[Simd::Portable], Some("avx2")),
            Simd::Portable
        );
    }
}
