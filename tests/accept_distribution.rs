//! Statistical tests of sampling-mode acceptance on a toy target (fixed seeds).
//!
//! The target is a random order-2 Markov model over 4 tokens; the drafter is a different, more
//! peaked order-1 model. Each test generates many continuations of a fixed prompt by speculative
//! rounds (draft beams → pack → per-node statistics → accept → emit path + bonus) and compares
//! the empirical distribution of the first `K` emitted tokens with the target's exact
//! distribution by a chi-square goodness-of-fit test.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redrafter::accept;
use redrafter::tree::DraftTree;

const V: usize = 4;
const K: usize = 3;
const SAMPLES: usize = 100_000;
/// The prompt's last two tokens: `PREV`, then the root `G0` of the first round.
const PREV: u32 = 0;
const G0: u32 = 1;

type Row = [f64; V];

struct Toy {
    /// Target p(x | a, b), indexed `a * V + b`.
    target: Vec<Row>,
    /// Drafter q(x | b).
    draft: Vec<Row>,
}

fn normalise(mut row: Row) -> Row {
    let s: f64 = row.iter().sum();
    row.iter_mut().for_each(|x| *x /= s);
    row
}

impl Toy {
    fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        // A floor keeps every 3-token outcome likely enough for the chi-square test.
        let target: Vec<Row> = (0..V * V)
            .map(|_| normalise(std::array::from_fn(|_| 0.15 + rng.random::<f64>())))
            .collect();
        // The drafter sharpens the target's average over the older token and adds noise: it is
        // correlated with the target (drafts get accepted) but clearly different.
        let draft = (0..V)
            .map(|b| {
                normalise(std::array::from_fn(|x| {
                    let avg: f64 = (0..V).map(|a| target[a * V + b][x]).sum::<f64>() / V as f64;
                    avg * avg * avg + 0.02 * rng.random::<f64>()
                }))
            })
            .collect();
        Self { target, draft }
    }

    fn p(&self, a: u32, b: u32) -> &Row {
        &self.target[a as usize * V + b as usize]
    }

    fn q(&self, b: u32) -> &Row {
        &self.draft[b as usize]
    }

    /// Exact probability of each `K`-token continuation after (PREV, G0), indexed base V.
    fn exact(&self) -> Vec<f64> {
        (0..V.pow(K as u32))
            .map(|code| {
                let seq = decode(code);
                let (mut a, mut b) = (PREV, G0);
                let mut prob = 1.0;
                for &x in &seq {
                    prob *= self.p(a, b)[x as usize];
                    (a, b) = (b, x);
                }
                prob
            })
            .collect()
    }
}

fn decode(mut code: usize) -> Vec<u32> {
    let mut seq = vec![0u32; K];
    for s in seq.iter_mut() {
        *s = (code % V) as u32;
        code /= V;
    }
    seq
}

fn encode(seq: &[u32]) -> usize {
    seq.iter().rev().fold(0, |acc, &x| acc * V + x as usize)
}

fn sample(row: &Row, rng: &mut SmallRng) -> u32 {
    let mut u = rng.random::<f64>();
    for (x, &p) in row.iter().enumerate() {
        if u < p {
            return x as u32;
        }
        u -= p;
    }
    (V - 1) as u32
}

/// How the drafter proposes beams.
#[derive(Clone, Copy)]
enum Drafts {
    /// M independent ancestral samples from q: random, with many duplicates.
    Sampled,
    /// Deterministic top-M beam search under q (SPEC §2), as the real drafter does.
    BeamSearch,
}

/// `[M*C]` beams from `root` under the drafter.
fn draft_beams(
    toy: &Toy,
    root: u32,
    m: usize,
    c: usize,
    how: Drafts,
    rng: &mut SmallRng,
) -> Vec<u32> {
    match how {
        Drafts::Sampled => {
            let mut beams = Vec::with_capacity(m * c);
            for _ in 0..m {
                let mut last = root;
                beams.push(root);
                for _ in 1..c {
                    last = sample(toy.q(last), rng);
                    beams.push(last);
                }
            }
            beams
        }
        Drafts::BeamSearch => {
            // Only beam 0 alive at first, as in SPEC §2, so step 1 does not grow M copies.
            let mut beams: Vec<(f64, Vec<u32>)> = vec![(0.0, vec![root])];
            for _ in 1..c {
                let mut cand: Vec<(f64, Vec<u32>)> = Vec::new();
                for (score, beam) in &beams {
                    let row = toy.q(*beam.last().unwrap());
                    for (x, &qx) in row.iter().enumerate() {
                        let mut b = beam.clone();
                        b.push(x as u32);
                        cand.push((score + qx.ln(), b));
                    }
                }
                // Stable: equal scores keep (beam, token) order.
                cand.sort_by(|a, b| b.0.total_cmp(&a.0));
                cand.truncate(m);
                beams = cand;
            }
            // Fewer distinct continuations than M (short beams): repeat the best, like the
            // reference's dead placeholder beams would.
            let mut out: Vec<u32> = beams.iter().flat_map(|(_, b)| b.clone()).collect();
            while out.len() < m * c {
                out.extend_from_slice(&beams[0].1);
            }
            out
        }
    }
}

/// The two tokens a node's next-token distribution conditions on.
fn node_context(tree: &DraftTree, prev: u32, node: usize) -> (u32, u32) {
    let tokens = tree.tokens();
    let a = tree.parent(node).map_or(prev, |p| tokens[p]);
    (a, tokens[node])
}

/// Which acceptance a round uses.
#[derive(Clone, Copy)]
enum Rule {
    /// `accept::walk` with one independent target sample per node.
    Walk,
    /// `accept::reference_parity` with the reference's residual bonus sampling.
    ReferenceParity,
}

/// One speculative round after (prev, root): returns the emitted tokens (drafted + bonus).
fn round(
    toy: &Toy,
    prev: u32,
    root: u32,
    (m, c): (usize, usize),
    drafts: Drafts,
    rule: Rule,
    rng: &mut SmallRng,
) -> Vec<u32> {
    let beams = draft_beams(toy, root, m, c, drafts, rng);
    let tree = DraftTree::pack(&beams, m, c).unwrap();
    let accepted = match rule {
        Rule::Walk => {
            let verdict: Vec<u32> = (0..tree.len())
                .map(|n| {
                    let (a, b) = node_context(&tree, prev, n);
                    sample(toy.p(a, b), rng)
                })
                .collect();
            accept::walk(&tree, &verdict).unwrap()
        }
        Rule::ReferenceParity => {
            let steps = c - 1;
            let mut p = vec![0f32; m * steps];
            let mut q = vec![0f32; m * steps];
            let un = tree.unpacker();
            for i in 0..m {
                for k in 0..steps {
                    let node = un[i * c + k];
                    let (a, b) = node_context(&tree, prev, node);
                    let next = beams[i * c + k + 1] as usize;
                    p[i * steps + k] = toy.p(a, b)[next] as f32;
                    q[i * steps + k] = toy.q(b)[next] as f32;
                }
            }
            let u: Vec<f32> = (0..m * steps).map(|_| rng.random::<f32>()).collect();
            // Bonus as in the reference: after a rejection from the residual max(p - q, 0),
            // after a fully accepted beam (a leaf) from p.
            let verdict: Vec<u32> = (0..tree.len())
                .map(|n| {
                    let (a, b) = node_context(&tree, prev, n);
                    let pr = toy.p(a, b);
                    if tree.depths()[n] + 1 == c {
                        return sample(pr, rng);
                    }
                    let qr = toy.q(b);
                    let resid: Row = std::array::from_fn(|x| (pr[x] - qr[x]).max(0.0));
                    if resid.iter().sum::<f64>() > 0.0 {
                        sample(&normalise(resid), rng)
                    } else {
                        sample(pr, rng)
                    }
                })
                .collect();
            accept::reference_parity(&tree, &p, &q, &u, &verdict).unwrap()
        }
    };
    accepted.emitted(&tree)
}

/// Empirical counts of the first K emitted tokens over `SAMPLES` continuations; also returns
/// the mean number of drafted tokens accepted per round.
fn simulate(toy: &Toy, drafts: Drafts, rule: Rule, seed: u64) -> (Vec<u64>, f64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut counts = vec![0u64; V.pow(K as u32)];
    let (mut rounds, mut accepted) = (0usize, 0usize);
    let shapes = [(1, 2), (3, 3), (6, 4), (2, 4), (8, 3), (4, 2)];
    let mut out = Vec::with_capacity(K + 8);
    for s in 0..SAMPLES {
        out.clear();
        let (mut prev, mut root) = (PREV, G0);
        while out.len() < K {
            let shape = shapes[(s + rounds) % shapes.len()];
            let emitted = round(toy, prev, root, shape, drafts, rule, &mut rng);
            rounds += 1;
            accepted += emitted.len() - 1;
            prev = if emitted.len() >= 2 {
                emitted[emitted.len() - 2]
            } else {
                root
            };
            root = *emitted.last().unwrap();
            out.extend_from_slice(&emitted);
        }
        counts[encode(&out[..K])] += 1;
    }
    (counts, accepted as f64 / rounds as f64)
}

/// ln Γ(x) for x > 0 (Lanczos approximation, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let t = x + 7.5;
    let sum: f64 = C[0] + (1..9).map(|i| C[i] / (x + i as f64)).sum::<f64>();
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// Regularised upper incomplete gamma Q(a, x): the series for P below a + 1, the continued
/// fraction (modified Lentz) above.
fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let prefactor = (-x + a * x.ln() - ln_gamma(a)).exp();
    if x < a + 1.0 {
        let (mut term, mut sum, mut n) = (1.0 / a, 1.0 / a, a);
        while term.abs() > sum.abs() * 1e-15 {
            n += 1.0;
            term *= x / n;
            sum += term;
        }
        1.0 - sum * prefactor
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        h * prefactor
    }
}

/// Chi-square goodness of fit: (statistic, p-value). Cells expecting fewer than 5 are pooled.
fn chi_square(counts: &[u64], probs: &[f64]) -> (f64, f64) {
    let n: u64 = counts.iter().sum();
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut pooled_o, mut pooled_e) = (0.0, 0.0);
    for (&o, &p) in counts.iter().zip(probs) {
        let e = p * n as f64;
        if e < 5.0 {
            pooled_o += o as f64;
            pooled_e += e;
        } else {
            stat += (o as f64 - e).powi(2) / e;
            cells += 1;
        }
    }
    if pooled_e > 0.0 {
        stat += (pooled_o - pooled_e).powi(2) / pooled_e.max(1e-12);
        cells += 1;
    }
    let dof = (cells - 1) as f64;
    (stat, gamma_q(dof / 2.0, stat / 2.0))
}

fn total_variation(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    0.5 * counts
        .iter()
        .zip(probs)
        .map(|(&o, &p)| (o as f64 / n as f64 - p).abs())
        .sum::<f64>()
}

#[test]
fn chi_square_helper_is_calibrated() {
    // Known quantiles: chi2(1) 95% = 3.8415, chi2(10) 99% = 23.209, chi2(63) median ≈ 62.33.
    assert!((gamma_q(0.5, 3.841_459 / 2.0) - 0.05).abs() < 1e-5);
    assert!((gamma_q(5.0, 23.209_25 / 2.0) - 0.01).abs() < 1e-5);
    assert!((gamma_q(31.5, 62.334_8 / 2.0) - 0.5).abs() < 1e-3);
    assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
}

const P_MIN: f64 = 1e-4;

#[test]
fn walk_with_sampled_drafts_is_exact() {
    let toy = Toy::new(7);
    let exact = toy.exact();
    let (counts, mean_accepted) = simulate(&toy, Drafts::Sampled, Rule::Walk, 11);
    let (stat, p) = chi_square(&counts, &exact);
    let tv = total_variation(&counts, &exact);
    assert!(p > P_MIN, "chi2 {stat:.1}, p {p:.2e}, tv {tv:.4}");
    assert!(tv < 0.02, "tv {tv:.4}");
    // Speculation really happened: rounds accept drafted tokens on average.
    assert!(mean_accepted > 0.5, "mean accepted {mean_accepted:.3}");
}

#[test]
fn walk_with_beam_search_drafts_is_exact() {
    let toy = Toy::new(7);
    let exact = toy.exact();
    let (counts, mean_accepted) = simulate(&toy, Drafts::BeamSearch, Rule::Walk, 12);
    let (stat, p) = chi_square(&counts, &exact);
    let tv = total_variation(&counts, &exact);
    assert!(p > P_MIN, "chi2 {stat:.1}, p {p:.2e}, tv {tv:.4}");
    assert!(tv < 0.02, "tv {tv:.4}");
    assert!(mean_accepted > 0.5, "mean accepted {mean_accepted:.3}");
}

#[test]
fn reference_parity_is_biased() {
    // The same target, drafts and sample budget as the exact test above: the published p/q rule
    // fails the same goodness-of-fit test by a wide margin.
    let toy = Toy::new(7);
    let exact = toy.exact();
    let (counts, _) = simulate(&toy, Drafts::BeamSearch, Rule::ReferenceParity, 12);
    let (stat, p) = chi_square(&counts, &exact);
    let tv = total_variation(&counts, &exact);
    assert!(p < 1e-12, "chi2 {stat:.1}, p {p:.2e}, tv {tv:.4}");
    assert!(tv > 0.05, "tv {tv:.4}");
}

#[test]
fn walk_expected_accepted_length_is_drafted_mass() {
    // For a fixed tree, E[accepted drafted tokens] = Σ over non-root nodes of the target
    // probability of reaching them, Π p along the path.
    let toy = Toy::new(3);
    let mut rng = SmallRng::seed_from_u64(5);
    let (m, c) = (6, 4);
    let beams = draft_beams(&toy, G0, m, c, Drafts::BeamSearch, &mut rng);
    let tree = DraftTree::pack(&beams, m, c).unwrap();
    let mut reach = vec![1.0f64; tree.len()];
    for n in 1..tree.len() {
        let parent = tree.parent(n).unwrap();
        let (a, b) = node_context(&tree, PREV, parent);
        reach[n] = reach[parent] * toy.p(a, b)[tree.tokens()[n] as usize];
    }
    let mass: f64 = reach[1..].iter().sum();
    let draws = 100_000;
    let (mut sum, mut sum_sq) = (0.0, 0.0);
    let mut verdict = vec![0u32; tree.len()];
    for _ in 0..draws {
        for (n, v) in verdict.iter_mut().enumerate() {
            let (a, b) = node_context(&tree, PREV, n);
            *v = sample(toy.p(a, b), &mut rng);
        }
        let d = accept::walk(&tree, &verdict).unwrap().drafted() as f64;
        sum += d;
        sum_sq += d * d;
    }
    let mean = sum / draws as f64;
    let sd = ((sum_sq / draws as f64 - mean * mean) / draws as f64).sqrt();
    assert!(mass > 0.3, "degenerate tree, mass {mass}");
    assert!(
        (mean - mass).abs() < 5.0 * sd,
        "mean {mean:.4}, mass {mass:.4}, sd {sd:.5}"
    );
}
