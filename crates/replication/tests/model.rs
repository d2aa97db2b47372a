//! Model-based test: random sequences of replica writes, zeroes and discards, VM writes,
//! zeroes, discards and reads, checkpoints, then a failover with VM I/O during the merge, run
//! against the formal model of docs/qemu-replication.md §1.7. Every byte the VM reads and the final secondary disk
//! must equal the model's.
//!
//! Model: `L` (secondary disk), `H` (cluster -> old content), `A` (byte map), `C` = dom H.
//! View `V(x) = A(x) if x in A else H[c](x) if c in H else L(x)`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use blockdev::{
    BlockDev, IoPool, MemoryDev, Qcow2, Qcow2Backing, Qcow2CreateOptions, Qcow2Options, WriteFlags,
    ZeroFlags,
};
use bytes::Bytes;
use proptest::prelude::*;
use replication::Mode;
use replication::secondary::{DevOverlay, SecondaryNode};

use common::{Backend, disk};

#[derive(Debug, Clone)]
enum Step {
    ReplicaWrite(u64, u64, u8),
    ReplicaZero(u64, u64),
    ReplicaDiscard(u64, u64),
    TopWrite(u64, u64, u8),
    TopZero(u64, u64),
    TopDiscard(u64, u64),
    TopRead(u64, u64),
    Checkpoint,
}

struct Model {
    k: u64,
    l: Vec<u8>,
    h: HashMap<u64, Vec<u8>>,
    a: Vec<Option<u8>>,
}

impl Model {
    fn new(len: u64, k: u64, init: &[u8]) -> Self {
        assert_eq!(init.len() as u64, len);
        Model {
            k,
            l: init.to_vec(),
            h: HashMap::new(),
            a: vec![None; len as usize],
        }
    }

    fn view(&self, x: usize) -> u8 {
        let c = x as u64 / self.k;
        self.a[x].unwrap_or_else(|| match self.h.get(&c) {
            Some(old) => old[x - (c * self.k) as usize],
            None => self.l[x],
        })
    }

    fn view_range(&self, off: u64, len: u64) -> Vec<u8> {
        (off as usize..(off + len) as usize)
            .map(|x| self.view(x))
            .collect()
    }

    fn replica(&mut self, off: u64, len: u64, byte: u8) {
        for c in off / self.k..=(off + len - 1) / self.k {
            let s = (c * self.k) as usize;
            let e = ((c + 1) * self.k).min(self.l.len() as u64) as usize;
            let old = self.l[s..e].to_vec();
            self.h.entry(c).or_insert(old);
        }
        self.l[off as usize..(off + len) as usize].fill(byte);
    }

    fn top(&mut self, off: u64, len: u64, byte: u8) {
        self.a[off as usize..(off + len) as usize].fill(Some(byte));
    }

    fn checkpoint(&mut self) {
        self.h.clear();
        self.a.fill(None);
    }

    fn failover(&mut self) {
        self.l = (0..self.l.len()).map(|x| self.view(x)).collect();
        self.checkpoint();
    }
}

/// Which overlays the node uses.
#[derive(Debug, Clone, Copy)]
enum Overlays {
    Internal(Backend),
    Device,
    Qcow2,
}

fn range(len: u64, k: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..len).prop_flat_map(move |off| {
        let max = (len - off).min(3 * k + 7);
        (Just(off), 1..=max)
    })
}

fn step(len: u64, k: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (range(len, k), any::<u8>()).prop_map(|((o, n), b)| Step::ReplicaWrite(o, n, b)),
        1 => range(len, k).prop_map(|(o, n)| Step::ReplicaZero(o, n)),
        1 => range(len, k).prop_map(|(o, n)| Step::ReplicaDiscard(o, n)),
        4 => (range(len, k), any::<u8>()).prop_map(|((o, n), b)| Step::TopWrite(o, n, b)),
        1 => range(len, k).prop_map(|(o, n)| Step::TopZero(o, n)),
        1 => range(len, k).prop_map(|(o, n)| Step::TopDiscard(o, n)),
        4 => range(len, k).prop_map(|(o, n)| Step::TopRead(o, n)),
        1 => Just(Step::Checkpoint),
    ]
}

/// A scenario: geometry, initial disk content, steps, and VM writes during the failover. The
/// disk length is a multiple of `align` (qcow2 images need whole sectors).
fn scenario(align: u64) -> impl Strategy<Value = (u64, u64, Vec<u8>, Vec<Step>, Vec<Step>)> {
    let sizes = (
        prop_oneof![Just(512u64), Just(4096), Just(16384)],
        0u64..3000,
    );
    sizes.prop_flat_map(move |(k, tail)| {
        let len = 12 * k + tail / align * align;
        (
            Just(k),
            Just(len),
            proptest::collection::vec(any::<u8>(), len as usize),
            proptest::collection::vec(step(len, k), 1..40),
            proptest::collection::vec(step(len, k), 0..8),
        )
    })
}

async fn check_read(top: &dyn BlockDev, model: &Model, off: u64, n: u64) {
    let got = top.read(off, n as usize).await.unwrap();
    let want = model.view_range(off, n);
    assert!(
        got[..] == want[..],
        "VM read {off}+{n} differs from the model"
    );
    // Block status may only claim zero where the view is zero.
    let st = top.block_status(off, n).await.unwrap();
    let mut pos = off;
    for e in st.iter() {
        if e.zero {
            let z = model.view_range(pos, e.len);
            assert!(
                z.iter().all(|&b| b == 0),
                "status says zero at {pos}+{} but data",
                e.len
            );
        }
        pos += e.len;
    }
}

async fn apply(node: &SecondaryNode, model: &mut Model, s: &Step, replica_allowed: bool) {
    let (top, rep) = (node.top(), node.replica());
    match *s {
        Step::ReplicaWrite(o, n, b) if replica_allowed => {
            rep.write(o, Bytes::from(vec![b; n as usize]), WriteFlags::default())
                .await
                .unwrap();
            model.replica(o, n, b);
        }
        Step::ReplicaZero(o, n) if replica_allowed => {
            rep.write_zeroes(o, n, ZeroFlags::default()).await.unwrap();
            model.replica(o, n, 0);
        }
        Step::ReplicaDiscard(o, n) if replica_allowed => {
            rep.discard(o, n).await.unwrap();
            model.replica(o, n, 0);
        }
        Step::TopWrite(o, n, b) => {
            top.write(o, Bytes::from(vec![b; n as usize]), WriteFlags::default())
                .await
                .unwrap();
            model.top(o, n, b);
        }
        Step::TopZero(o, n) => {
            top.write_zeroes(o, n, ZeroFlags::default()).await.unwrap();
            model.top(o, n, 0);
        }
        Step::TopDiscard(o, n) => {
            top.discard(o, n).await.unwrap();
            model.top(o, n, 0);
        }
        Step::TopRead(o, n) => check_read(&top, model, o, n).await,
        Step::Checkpoint if replica_allowed => {
            node.checkpoint().await.unwrap();
            model.checkpoint();
        }
        _ => {}
    }
}

async fn run(
    overlays: Overlays,
    k: u64,
    len: u64,
    init: Vec<u8>,
    steps: Vec<Step>,
    during: Vec<Step>,
) {
    let dir = tempfile::tempdir().unwrap();
    let backend = match overlays {
        Overlays::Internal(b) => b,
        Overlays::Device | Overlays::Qcow2 => Backend::Memory,
    };
    let disk = disk(backend, &dir, len);
    disk.write(0, Bytes::from(init.clone()), WriteFlags::default())
        .await
        .unwrap();
    let node = match overlays {
        Overlays::Internal(b) => {
            SecondaryNode::new(disk.clone(), common::config(b, &dir, k)).unwrap()
        }
        Overlays::Device => SecondaryNode::with_overlays(
            disk.clone(),
            k,
            Arc::new(DevOverlay::new(Arc::new(MemoryDev::new(len)))),
            Arc::new(DevOverlay::new(Arc::new(MemoryDev::new(len)))),
        )
        .unwrap(),
        Overlays::Qcow2 => {
            let image = |name: &str| -> Arc<dyn BlockDev> {
                let p = dir.path().join(name);
                let opts = Qcow2CreateOptions {
                    cluster_size: 4096,
                    ..Default::default()
                };
                Qcow2::create(&p, len, opts).unwrap();
                let opts = Qcow2Options {
                    backing: Qcow2Backing::None,
                    ..Default::default()
                };
                Arc::new(Qcow2::open(&p, opts, IoPool::default()).unwrap())
            };
            SecondaryNode::with_overlays(
                disk.clone(),
                k,
                Arc::new(DevOverlay::new(image("active.qcow2"))),
                Arc::new(DevOverlay::new(image("hidden.qcow2"))),
            )
            .unwrap()
        }
    };
    node.start(Mode::Secondary).await.unwrap();
    let mut model = Model::new(len, k, &init);
    for s in &steps {
        apply(&node, &mut model, s, true).await;
    }
    check_read(&node.top(), &model, 0, len).await;
    node.stop(true).await.unwrap();
    for s in &during {
        apply(&node, &mut model, s, false).await;
    }
    node.wait_failover().await.unwrap();
    model.failover();
    let got = disk.read(0, len as usize).await.unwrap();
    assert!(
        got[..] == model.l[..],
        "secondary disk after failover differs from the model"
    );
    check_read(&node.top(), &model, 0, len).await;
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn model_memory_overlays((k, len, init, steps, during) in scenario(1)) {
        block_on(run(Overlays::Internal(Backend::Memory), k, len, init, steps, during));
    }

    #[test]
    fn model_raw_disk_file_overlays((k, len, init, steps, during) in scenario(1)) {
        block_on(run(Overlays::Internal(Backend::Raw), k, len, init, steps, during));
    }

    #[test]
    fn model_qcow2_overlays((k, len, init, steps, during) in scenario(512)) {
        block_on(run(Overlays::Qcow2, k, len, init, steps, during));
    }

    #[test]
    fn model_device_overlays((k, len, init, steps, during) in scenario(1)) {
        block_on(run(Overlays::Device, k, len, init, steps, during));
    }
}
