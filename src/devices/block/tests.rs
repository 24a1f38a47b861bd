use super::*;
use crate::hw::virtio::GuestMem;
use crate::hw::virtio::testing::{NEXT, WRITE, desc, mem, raw};
use std::io::Write;
use virtio_queue::mock::MockSplitQueue;

const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;

fn disk(readonly: bool) -> (tempfile::NamedTempFile, Disk) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0u8; 1 << 20]).unwrap();
    let d = Disk::open(f.path(), readonly, "SERIAL-1").unwrap();
    (f, d)
}

fn header(m: &GuestMem, kind: u32, sector: u64) {
    m.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

/// Runs one request chain; returns (status byte, used length).
fn run(m: &GuestMem, d: &Disk, descs: &[virtio_queue::desc::RawDescriptor]) -> (u8, u32) {
    let vq = MockSplitQueue::new(m, 16);
    vq.build_desc_chain(descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(process(&mut q, m, d, 256) > 0);
    let used = vq.used().ring().ref_at(0).unwrap().load();
    (m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), used.len())
}

/// Header, one data buffer of `len` bytes, status (the header is written separately).
fn rw(len: u32, data_flags: u16) -> Vec<virtio_queue::desc::RawDescriptor> {
    vec![
        desc(HDR, 16, 0),
        desc(DATA, len, data_flags),
        desc(STATUS, 1, WRITE),
    ]
}

#[test]
fn write_then_read_back() {
    let m = mem();
    let (f, d) = disk(false);
    m.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 8);
    assert_eq!(run(&m, &d, &rw(1024, 0)), (VIRTIO_BLK_S_OK, 1));
    let on_disk = std::fs::read(f.path()).unwrap();
    assert!(on_disk[4096..5120].iter().all(|&b| b == 0xab));
    assert!(on_disk[5120..6144].iter().all(|&b| b == 0));
    m.write_slice(&[0; 1024], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_IN, 8);
    assert_eq!(run(&m, &d, &rw(1024, WRITE)), (VIRTIO_BLK_S_OK, 1025));
    let mut back = [0u8; 1024];
    m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0xab));
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let m = mem();
    let (f, d) = disk(false);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        run(&m, &d, &[desc(HDR, 16, 0), desc(STATUS, 1, WRITE)]).0,
        VIRTIO_BLK_S_OK
    );
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(run(&m, &d, &rw(20, WRITE)), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 8];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"SERIAL-1");
    // Write ones, then zero sectors 2..4 with write-zeroes.
    std::fs::write(f.path(), vec![1u8; 1 << 20]).unwrap();
    let seg: Vec<u8> = [
        2u64.to_le_bytes().as_slice(),
        &2u32.to_le_bytes(),
        &0u32.to_le_bytes(),
    ]
    .concat();
    m.write_slice(&seg, GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(run(&m, &d, &rw(16, 0)).0, VIRTIO_BLK_S_OK);
    let on_disk = std::fs::read(f.path()).unwrap();
    assert!(
        on_disk[1024..2048].iter().all(|&b| b == 0) && on_disk[512..1024].iter().all(|&b| b == 1)
    );
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(run(&m, &d, &rw(16, 0)).0, VIRTIO_BLK_S_OK);
}

#[test]
fn bad_requests_get_error_statuses() {
    let m = mem();
    let (_f, d) = disk(false);
    let (_g, ro) = disk(true);
    let sectors = d.sectors();
    let cases: Vec<(&str, &Disk, u32, u64, u32, u16, u8)> = vec![
        (
            "read past the end",
            &d,
            VIRTIO_BLK_T_IN,
            sectors - 1,
            1024,
            WRITE,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "sector overflow",
            &d,
            VIRTIO_BLK_T_IN,
            u64::MAX,
            512,
            WRITE,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "partial sector",
            &d,
            VIRTIO_BLK_T_IN,
            0,
            100,
            WRITE,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "read into readable buffers",
            &d,
            VIRTIO_BLK_T_IN,
            0,
            512,
            0,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "write from writable buffers",
            &d,
            VIRTIO_BLK_T_OUT,
            0,
            512,
            WRITE,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "write to a read-only disk",
            &ro,
            VIRTIO_BLK_T_OUT,
            0,
            512,
            0,
            VIRTIO_BLK_S_IOERR,
        ),
        ("unknown type", &d, 0x77, 0, 512, 0, VIRTIO_BLK_S_UNSUPP),
    ];
    for (what, disk, kind, sector, len, flags, want) in cases {
        header(&m, kind, sector);
        assert_eq!(run(&m, disk, &rw(len, flags)).0, want, "{what}");
    }
    // Data outside guest memory.
    header(&m, VIRTIO_BLK_T_IN, 0);
    let descs = [
        desc(HDR, 16, 0),
        desc(0xfff_0000, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run(&m, &d, &descs).0, VIRTIO_BLK_S_IOERR);
    // A header too short.
    let descs = [desc(HDR, 8, 0), desc(STATUS, 1, WRITE)];
    assert_eq!(run(&m, &d, &descs).0, VIRTIO_BLK_S_IOERR);
}

#[test]
fn chains_without_a_status_byte_are_returned_empty() {
    let m = mem();
    let (_f, d) = disk(false);
    header(&m, VIRTIO_BLK_T_IN, 0);
    for descs in [
        vec![desc(HDR, 16, 0), desc(DATA, 512, 0)], // nothing writable
        vec![desc(HDR, 16, 0), desc(STATUS, 0, WRITE)], // zero-length status
        vec![desc(HDR, 16, 0), desc(0xfff_ffff_0000, 1, WRITE)], // status out of memory
        // A 4 GiB buffer: the chain ends there (virtio-queue stops at 4 GiB in total) and
        // its last byte, where the status would be, is outside guest memory.
        vec![
            desc(HDR, 16, 0),
            desc(DATA, u32::MAX, WRITE),
            desc(STATUS, 1, WRITE),
        ],
    ] {
        let (status, used) = run(&m, &d, &descs);
        assert_eq!((status, used), (0xff, 0));
    }
}

#[test]
fn descriptor_loops_and_avail_jumps_end_without_panicking() {
    let m = mem();
    let (_f, d) = disk(false);
    header(&m, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&m, 16);
    // 0 → 1 → 0 → …
    vq.add_desc_chains(&[raw(HDR, 16, NEXT, 1), raw(DATA, 512, NEXT | WRITE, 0)], 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    process(&mut q, &m, &d, 256);
    // The driver claims 1000 more requests than the ring holds, with garbage heads.
    vq.avail().idx().store(1001u16.to_le());
    for i in 0..16 {
        vq.avail()
            .ring()
            .ref_at(i)
            .unwrap()
            .store(0xbeefu16.wrapping_add(i as u16).to_le());
    }
    let mut q: Queue = vq.create_queue().unwrap();
    process(&mut q, &m, &d, 256);
}

#[test]
fn config_space_reports_capacity_and_features() {
    let (_f, d) = disk(true);
    let c = config_bytes(&d);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
    assert_ne!(features(&d) & VIRTIO_BLK_F_RO, 0);
    assert_eq!(features(&d) & VIRTIO_BLK_F_DISCARD, 0);
    let b = Block::new(d);
    let mut x = [0u8; 8];
    b.read_config(0, &mut x);
    assert_eq!(u64::from_le_bytes(x), 2048);
    b.read_config(1000, &mut x);
    assert_eq!(x, [0; 8]);
}

#[test]
fn a_locked_image_is_refused() {
    let (f, _d) = disk(false);
    let e = Disk::open(f.path(), false, "x").unwrap_err();
    assert!(e.contains("in use by another process"), "{e}");
}
