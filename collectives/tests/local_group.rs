//! The in-process stand-in gives NCCL's results, in rank order, and fails like a job should.

use collectives::local::LocalGroup;
use collectives::{CollectiveError, Collectives, TensorMut};
use cubecl::wgpu::WgpuRuntime;
use dsl::{Device, GpuTensor};
use std::time::Duration;

type R = WgpuRuntime;

/// Runs `body(rank, group)` on `world` threads sharing one device, returning each rank's result.
fn on_ranks<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    body: impl Fn(usize, LocalGroup, Device<R>) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let device = Device::<R>::open().expect("a wgpu device");
    let handles: Vec<_> = LocalGroup::new(world, timeout)
        .into_iter()
        .enumerate()
        .map(|(rank, group)| {
            let (body, device) = (body.clone(), device.clone());
            std::thread::spawn(move || body(rank, group, device))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

#[test]
fn all_reduce_reduce_and_broadcast_match_their_definitions() {
    let results = on_ranks(3, Duration::from_secs(60), |rank, mut group, device| {
        let values: Vec<f32> = (0..5).map(|i| (rank * 10 + i) as f32 + 0.25).collect();
        let mut a = GpuTensor::from_slice(&device, &values, &[5]).unwrap();
        group.all_reduce_sum(&device, &mut a).unwrap();
        let mut r = GpuTensor::from_slice(&device, &values, &[5]).unwrap();
        group.reduce_sum(&device, &mut r, 1).unwrap();
        let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
        let mut b = GpuTensor::from_slice(&device, &halves, &[5]).unwrap();
        group.broadcast(&device, TensorMut::of(&mut b), 2).unwrap();
        (values, a.to_vec(&device).unwrap(), r.to_vec(&device).unwrap(), b.to_vec(&device).unwrap())
    });
    let inputs: Vec<&Vec<f32>> = results.iter().map(|r| &r.0).collect();
    // Rank order: ((x0 + x1) + x2), starting from 0.
    let sum: Vec<f32> = (0..5).map(|i| 0.0 + inputs[0][i] + inputs[1][i] + inputs[2][i]).collect();
    for (rank, (values, all, reduced, broadcast)) in results.iter().enumerate() {
        assert_eq!(all, &sum, "all_reduce on rank {rank}");
        assert_eq!(reduced, if rank == 1 { &sum } else { values }, "reduce on rank {rank}");
        let root: Vec<half::f16> = inputs[2].iter().map(|&v| half::f16::from_f32(v)).collect();
        assert_eq!(broadcast, &root, "broadcast on rank {rank}");
    }
}

#[test]
fn a_rank_that_leaves_fails_the_others_naming_it() {
    let results = on_ranks(3, Duration::from_secs(60), |rank, mut group, device| {
        let mut x = GpuTensor::<R, f32>::zeros(&device, &[2]).unwrap();
        if rank == 1 {
            Collectives::<R>::abort(&mut group, "data file missing");
            return None;
        }
        Some(group.all_reduce_sum(&device, &mut x).unwrap_err())
    });
    for error in results.into_iter().flatten() {
        assert!(matches!(&error, CollectiveError::PeerFailed { peer: 1, .. }), "{error}");
        assert!(error.to_string().contains("rank 1 left the job: data file missing"), "{error}");
    }
    // A rank whose thread just ends (drops its end) is named too.
    let results = on_ranks(2, Duration::from_secs(60), |rank, mut group, device| {
        let mut x = GpuTensor::<R, f32>::zeros(&device, &[2]).unwrap();
        if rank == 0 {
            drop(group);
            return None;
        }
        Some(group.all_reduce_sum(&device, &mut x).unwrap_err().to_string())
    });
    let message = results.into_iter().flatten().next().unwrap();
    assert!(message.contains("rank 0 left the job: it stopped"), "{message}");
}

#[test]
fn waiting_is_bounded_and_mismatches_are_named() {
    let results = on_ranks(2, Duration::from_millis(300), |rank, mut group, device| {
        let mut x = GpuTensor::<R, f32>::zeros(&device, &[2]).unwrap();
        if rank == 1 {
            // Late, not gone: rank 0 times out, and this rank then hears of it.
            std::thread::sleep(Duration::from_millis(1500));
            let error = group.all_reduce_sum(&device, &mut x).unwrap_err().to_string();
            std::mem::forget(group);
            return error;
        }
        let error = group.all_reduce_sum(&device, &mut x).unwrap_err().to_string();
        std::mem::forget(group);
        error
    });
    assert!(results[0].contains("timed out") && results[0].contains("rank(s) [1]"), "{}", results[0]);
    assert!(results[1].contains("rank 0 left the job"), "{}", results[1]);

    let results = on_ranks(2, Duration::from_secs(60), |rank, mut group, device| {
        let mut x = GpuTensor::<R, f32>::zeros(&device, &[2 + rank]).unwrap();
        group.all_reduce_sum(&device, &mut x).unwrap_err().to_string()
    });
    assert!(results[0].contains("ranks disagree") && results[0].contains("sent"), "{}", results[0]);
}
