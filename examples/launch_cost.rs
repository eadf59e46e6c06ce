//! What one kernel launch costs the host on CUDA, by the arguments it binds.
//!
//! A decoding step of SmolLM2 is ~190 launches, and on the H200 the host spends ~11–12 µs
//! queuing each of ours against ~8 for a Burn `add` (docs/benchmarks.md, sessions 16–17). CubeCL
//! copies each launch's tensor shapes and strides ("dynamic metadata") into a fresh device buffer,
//! where arrays and scalar arguments travel in the launch's constant block. This times
//! near-empty kernels that bind one array, six arrays and four scalars, two tensors and six
//! tensors: each launched `--launches` times back to back, then one sync; reported per launch as
//! host time to enqueue and time until the device is done.
//!
//! ```text
//! cargo run --release --no-default-features --features cuda --example launch_cost
//! ```

use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{Tensor as BurnTensor, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use clap::Parser;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use redrafter::backend::Cuda;

#[derive(Parser, Debug)]
struct Args {
    /// Launches per measurement.
    #[arg(long, default_value_t = 2000)]
    launches: usize,
    /// Measurements per kernel (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

#[cube(launch_unchecked)]
fn one_array(out: &mut Array<f32>) {
    if ABSOLUTE_POS == 0 {
        out[0] += 1.0;
    }
}

#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn six_arrays(
    a: &Array<f32>,
    b: &Array<f32>,
    c: &Array<f32>,
    d: &Array<f32>,
    e: &Array<f32>,
    out: &mut Array<f32>,
    i: u32,
    j: u32,
    k: u32,
    l: u32,
) {
    if ABSOLUTE_POS == 0 {
        out[0] = a[i as usize] + b[j as usize] + c[k as usize] + d[l as usize] + e[0];
    }
}

#[cube(launch_unchecked)]
fn two_tensors(a: &Tensor<f32>, out: &mut Tensor<f32>) {
    if ABSOLUTE_POS == 0 {
        out[0] = a[a.stride(0) + a.shape(1) - 1 - a.shape(1)];
    }
}

#[cube(launch_unchecked)]
fn six_tensors(
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    c: &Tensor<f32>,
    d: &Tensor<f32>,
    e: &Tensor<f32>,
    out: &mut Tensor<f32>,
) {
    if ABSOLUTE_POS == 0 {
        out[out.stride(1) - 1] = a[a.stride(1) - 1]
            + b[b.stride(1) - 1]
            + c[c.stride(1) - 1]
            + d[d.stride(1) - 1]
            + e[e.shape(0) - e.shape(0)];
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Default::default();
    let cube = |rows: usize| -> Result<CubeTensor<CudaRuntime>> {
        let tensor = BurnTensor::<Cuda, 2>::zeros([rows, 64], &device);
        match tensor.into_primitive() {
            TensorPrimitive::Float(primitive) => Ok(primitive),
            TensorPrimitive::QFloat(_) => None.context("a float tensor"),
        }
    };
    let inputs: Vec<CubeTensor<CudaRuntime>> = (0..6).map(|_| cube(64)).collect::<Result<_>>()?;
    let client = inputs[0].client.clone();
    let one = || CubeCount::Static(1, 1, 1);
    let dim = CubeDim::new_1d(32);
    let arg = |i: usize| inputs[i].clone().into_tensor_arg();
    let array = |i: usize| inputs[i].clone().into_array_arg();
    type Launch<'a> = Box<dyn Fn() + 'a>;
    let kernels: Vec<(&str, Launch)> = vec![
        (
            "one array",
            Box::new(|| unsafe { one_array::launch_unchecked(&client, one(), dim, array(5)) }),
        ),
        (
            "six arrays + four scalars",
            Box::new(|| unsafe {
                six_arrays::launch_unchecked(
                    &client,
                    one(),
                    dim,
                    array(0),
                    array(1),
                    array(2),
                    array(3),
                    array(4),
                    array(5),
                    1,
                    2,
                    3,
                    4,
                )
            }),
        ),
        (
            "two tensors",
            Box::new(|| unsafe {
                two_tensors::launch_unchecked(&client, one(), dim, arg(0), arg(5))
            }),
        ),
        (
            "six tensors",
            Box::new(|| unsafe {
                six_tensors::launch_unchecked(
                    &client,
                    one(),
                    dim,
                    arg(0),
                    arg(1),
                    arg(2),
                    arg(3),
                    arg(4),
                    arg(5),
                )
            }),
        ),
    ];
    let sync = || cubecl::future::block_on(client.sync()).context("device sync");
    for (name, launch) in &kernels {
        for _ in 0..100 {
            launch();
        }
        sync()?;
        let mut host = Vec::new();
        let mut done = Vec::new();
        for _ in 0..args.reps {
            let start = Instant::now();
            for _ in 0..args.launches {
                launch();
            }
            host.push(start.elapsed().as_secs_f64() * 1e6 / args.launches as f64);
            sync()?;
            done.push(start.elapsed().as_secs_f64() * 1e6 / args.launches as f64);
        }
        let median = |values: &mut Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        println!(
            "{name:<28} host {:>6.2} µs/launch   until done {:>6.2} µs/launch",
            median(&mut host),
            median(&mut done)
        );
    }
    Ok(())
}
