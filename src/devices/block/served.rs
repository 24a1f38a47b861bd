//! `vmm device block`: virtio-blk on a raw image as a vhost-user backend, served by the same
//! [`process`] the in-VM device runs.

use super::{Disk, VIRTIO, config_bytes, features, process};
use crate::contract::VirtioInfo;
use crate::hw::served::{Ctx, Served, serve_simple};
use crate::hw::virtio::BUDGET;

/// virtio-blk on a raw image.
#[derive(Debug)]
pub struct BlockModel {
    disk: Disk,
    config: [u8; 60],
}

impl BlockModel {
    pub fn new(disk: Disk) -> BlockModel {
        BlockModel {
            config: config_bytes(&disk),
            disk,
        }
    }
}

impl Served for BlockModel {
    fn virtio(&self) -> &'static VirtioInfo {
        &VIRTIO
    }
    fn features(&self) -> u64 {
        features(&self.disk)
    }
    fn config(&self) -> Vec<u8> {
        self.config.to_vec()
    }
    fn handle(&self, event: u16, cx: &Ctx<'_>) -> std::io::Result<()> {
        match cx.vrings.get(usize::from(event)) {
            Some(v) => serve_simple(v, cx.mem, cx.event_idx, event, |q| {
                process(q, cx.mem, &self.disk, BUDGET)
            }),
            None => Ok(()),
        }
    }
    fn reset(&self) {
        // A flush that failed fails every later one only until the driver starts over.
        self.disk.reset();
    }
}
