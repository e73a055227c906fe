//! Hot-path micro-benchmarks (criterion; run with `cargo bench --bench hot`): SHA-256 the way
//! the agent hashes files, and zstd-3 and AES-256-GCM through the upload encoder chain.
//! `scripts/bench` runs them next to `openssl speed -evp sha256`, `openssl speed -evp
//! aes-256-gcm` and `zstd -3` on the same machine and prints the ratios.
//!
//! The compressible input is `PANOPTIC_BENCH_CORPUS` when set (so `zstd -3` can be timed on
//! the very same bytes), otherwise generated log-like text.

use std::hint::black_box;
use std::io::{self, Write};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use panoptic_sync::crypto::MasterKey;
use panoptic_sync::format::layout::Compression;
use panoptic_sync::format::layout::Plan;
use panoptic_sync::pipeline::{self, Finish, Meta, Pipeline};

const SIZE: usize = 16 << 20;

/// The end of the chain: counts and drops the bytes.
struct Discard(u64);

impl Write for Discard {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Finish for Discard {
    fn finish(self: Box<Self>) -> io::Result<()> {
        black_box(self.0);
        Ok(())
    }
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    fastrand::fill(&mut v);
    v
}

fn corpus() -> Vec<u8> {
    if let Ok(path) = std::env::var("PANOPTIC_BENCH_CORPUS") {
        return std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    }
    let mut out = Vec::with_capacity(SIZE);
    let mut i = 0u64;
    while out.len() < SIZE {
        writeln!(
            out,
            "2026-11-26T03:42:{:02}.{:06}Z INFO test_runner: case {} of suite {} passed in {} ms",
            i % 60,
            fastrand::u32(..1_000_000),
            i,
            fastrand::u8(..40),
            fastrand::u16(..5000)
        )
        .unwrap();
        i += 1;
    }
    out
}

fn encode(pipeline: &Pipeline, plan: Plan, data: &[u8]) {
    let meta = Meta {
        size: data.len() as u64,
        mtime_ns: 0,
        sha256: String::new(),
        ..Default::default()
    };
    let mut out =
        pipeline::encoder(pipeline, plan, &meta, "bench/x", Box::new(Discard(0))).unwrap();
    out.write_all(data).unwrap();
    out.finish().unwrap();
}

fn hot(c: &mut Criterion) {
    let data = random(SIZE);
    let text = corpus();
    let mut g = c.benchmark_group("hot");
    g.sample_size(10);

    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("sha256", |b| {
        b.iter(|| pipeline::copy_hashed(&mut &data[..], &mut io::sink()).unwrap())
    });

    let aes = Pipeline {
        key: Some(MasterKey::from_bytes([7; 32])),
        ..Pipeline::plain()
    };
    let plan = Plan {
        compression: Compression::None,
        encrypt: true,
    };
    g.bench_function("aes-256-gcm", |b| b.iter(|| encode(&aes, plan, &data)));

    let zstd = Pipeline {
        compression: Compression::Zstd,
        level: 3,
        ..Pipeline::plain()
    };
    let plan = Plan {
        compression: Compression::Zstd,
        encrypt: false,
    };
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("zstd-3", |b| b.iter(|| encode(&zstd, plan, &text)));
    g.finish();
}

criterion_group!(benches, hot);
criterion_main!(benches);
