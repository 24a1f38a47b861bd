//! virtio-blk on a disk that really fails (qemu-storage-daemon's blkdebug behind a FUSE
//! export): the block model's request path against host faults, without a guest.

mod common;

use common::qsd::{Export, Fault};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::block::{
    Disk, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT, process,
};

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;

/// Runs one request (header, optional data, status) through the model; returns its status.
fn request(mem: &GuestMemoryMmap<()>, disk: &Disk, kind: u32, data: Option<u32>) -> u8 {
    mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut descs = vec![RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0))];
    if let Some(len) = data {
        descs.push(RawDescriptor::from(Descriptor::new(DATA, len, 0, 0)));
    }
    descs.push(RawDescriptor::from(Descriptor::new(STATUS, 1, 2, 0)));
    let vq = MockSplitQueue::new(mem, 16);
    vq.build_desc_chain(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert_eq!(process(&mut q, mem, disk, 16), 1);
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// Once a flush failed, every later flush fails until the device is reset, although the disk
/// would report the next one a success: the kernel may have dropped the pages it could not
/// write, so "flushed" would be a lie about the data written before the failure.
#[test]
fn a_failed_flush_fails_every_later_flush_until_a_reset() {
    if !common::qsd::available("a_failed_flush_fails_every_later_flush_until_a_reset") {
        return;
    }
    let export = Export::new(1 << 20, Fault::FlushFailsOnce);
    let disk = Disk::open(&export.path, false, "faulty").expect("the export opens");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        request(&mem, &disk, VIRTIO_BLK_T_OUT, Some(512)),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        request(&mem, &disk, VIRTIO_BLK_T_FLUSH, None),
        VIRTIO_BLK_S_IOERR,
        "the injected failure"
    );
    // The disk itself would now say yes (blkdebug fails once): vmm keeps saying no.
    for _ in 0..3 {
        assert_eq!(
            request(&mem, &disk, VIRTIO_BLK_T_FLUSH, None),
            VIRTIO_BLK_S_IOERR
        );
    }
    // Writes still go through; a flush fails until the driver resets the device.
    assert_eq!(
        request(&mem, &disk, VIRTIO_BLK_T_OUT, Some(512)),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        request(&mem, &disk, VIRTIO_BLK_T_FLUSH, None),
        VIRTIO_BLK_S_IOERR
    );
    disk.reset();
    assert_eq!(
        request(&mem, &disk, VIRTIO_BLK_T_FLUSH, None),
        VIRTIO_BLK_S_OK
    );
}
