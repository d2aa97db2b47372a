//! What TLS's cipher costs on this machine, next to a copy of the same bytes: the floor under
//! the record layer's cost per replicated MiB (bench/tls.sh measures the whole link).
//!
//! - `aead/seal` and `aead/open`: aws-lc's AES-128-GCM (the suite our links negotiate) on one
//!   full 16 KiB record, sealed out of place with its content type byte as the record layer
//!   does, and opened out of place. `hot`: the same record again and again (in cache); `cold`:
//!   records walked through 256 MiB, as a replicated payload arrives.
//! - `aead/memcpy`: copying the same record, hot and cold: the kind of work a plain replicated
//!   byte costs (a kernel socket copy is a copy).
//!
//! A replicated MiB is sealed once on the primary and opened once on the secondary.

use std::hint::black_box;

use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const RECORD: usize = 1 << 14;
const SEALED: usize = RECORD + 1 + 16;
const COLD: usize = 256 << 20;

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad() -> Aad<[u8; 5]> {
    Aad::from([23, 3, 3, (SEALED >> 8) as u8, SEALED as u8])
}

/// Seals one record of application data as the record layer does: out of place, the content
/// type byte and the tag after the ciphertext.
fn seal(key: &LessSafeKey, seq: u64, plain: &[u8], out: &mut [u8]) {
    let (body, rest) = out.split_at_mut(RECORD);
    key.seal_out_of_place_scatter(nonce(seq), aad(), plain, body, &[23], rest)
        .unwrap();
}

/// Record slots in a buffer of `size` bytes, walked in order.
struct Walk {
    at: usize,
    size: usize,
}

impl Walk {
    fn next(&mut self) -> usize {
        if self.at + SEALED > self.size {
            self.at = 0;
        }
        let at = self.at;
        self.at += SEALED;
        at
    }
}

fn aead(c: &mut Criterion) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7; 16]).unwrap());
    let mut g = c.benchmark_group("aead");
    g.throughput(Throughput::Bytes(RECORD as u64));
    for (name, size) in [("hot", SEALED), ("cold", COLD)] {
        let plain = vec![0x5a_u8; size];
        let mut sealed = vec![0u8; size];
        // Every slot holds a valid record, so that `open` does the whole work and succeeds.
        let mut walk = Walk { at: 0, size };
        for seq in 0..(size / SEALED) as u64 {
            let at = walk.next();
            seal(
                &key,
                seq,
                &plain[at..at + RECORD],
                &mut sealed[at..at + SEALED],
            );
        }
        let mut out = vec![0u8; size];

        g.bench_function(BenchmarkId::new("seal", name), |b| {
            let mut walk = Walk { at: 0, size };
            b.iter(|| {
                let at = walk.next();
                seal(&key, 0, &plain[at..at + RECORD], &mut out[at..at + SEALED]);
            })
        });
        g.bench_function(BenchmarkId::new("open", name), |b| {
            let mut walk = Walk { at: 0, size };
            let mut seq = 0;
            b.iter(|| {
                let at = walk.next();
                if at == 0 {
                    seq = 0;
                }
                let (ct, tag) = sealed[at..at + SEALED].split_at(RECORD + 1);
                key.open_separate_gather(nonce(seq), aad(), ct, tag, &mut out[at..at + RECORD + 1])
                    .unwrap();
                seq += 1;
            })
        });
        g.bench_function(BenchmarkId::new("memcpy", name), |b| {
            let mut walk = Walk { at: 0, size };
            b.iter(|| {
                let at = walk.next();
                out[at..at + RECORD].copy_from_slice(black_box(&plain[at..at + RECORD]));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
