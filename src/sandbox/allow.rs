//! Allowlists: the system calls each kind of thread may make, beyond [`COMMON`].
//!
//! A device kind's worker list lives in the device's own file (its `SECCOMP` constant, named
//! by its registry line); the lists here are for the threads vmm itself runs. Every list was
//! found by running the suite under `strace -f` and then trimmed to what the code needs; a
//! call missing from a list kills vmm with a message naming the thread kind and the call, so
//! the suite (which always runs with seccomp on) fails on the first miss.

/// One allowed system call, optionally only with some argument values.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub nr: i64,
    pub name: &'static str,
    pub only: Only,
}

/// Which arguments a [`Call`] is allowed with.
#[derive(Debug, Clone, Copy)]
pub enum Only {
    /// Any arguments.
    Any,
    /// Argument `.0` (low 32 bits) is one of `.1`: ioctl requests, fcntl commands, socket
    /// families.
    Arg(u8, &'static [u64]),
    /// Argument 2 (`prot` of mmap and mprotect) without PROT_EXEC: no thread maps new code.
    NoExec,
}

/// A thread kind's allowlist.
#[derive(Debug)]
pub struct Allow {
    /// The thread kind, as the SIGSYS message and docs/security.md name it.
    pub kind: &'static str,
    pub calls: &'static [Call],
    /// What a device kind does on a vCPU thread, in the driver's register writes (activation
    /// and reset: e.g. a NIC's TUNSETOFFLOAD): the vCPU filter allows every kind's.
    pub on_vcpu: &'static [Call],
}

impl Allow {
    /// The system calls a thread of this kind may make, as its filter is built: [`COMMON`],
    /// its list, [`WORKER_BASE`] for a device worker, every kind's `on_vcpu` for a vCPU (a call
    /// allowed with several argument lists counts once).
    pub fn count(&self, worker: bool, kinds: &[&Allow]) -> usize {
        let mut n: Vec<i64> = COMMON.iter().chain(self.calls).map(|c| c.nr).collect();
        if worker {
            n.extend(WORKER_BASE.iter().map(|c| c.nr));
        }
        if self.kind == VCPU.kind {
            n.extend(kinds.iter().flat_map(|k| k.on_vcpu).map(|c| c.nr));
        }
        n.sort_unstable();
        n.dedup();
        n.len()
    }
}

/// `call!(read)`, `call!(ioctl, 1, [..])`, `call!(mmap, noexec)`.
#[macro_export]
#[doc(hidden)]
macro_rules! call {
    ($name:ident) => {
        $crate::sandbox::Call {
            nr: ::libc::$name,
            name: $crate::sandbox::strip_sys(stringify!($name)),
            only: $crate::sandbox::Only::Any,
        }
    };
    ($name:ident, noexec) => {
        $crate::sandbox::Call {
            nr: ::libc::$name,
            name: $crate::sandbox::strip_sys(stringify!($name)),
            only: $crate::sandbox::Only::NoExec,
        }
    };
    ($name:ident, $arg:literal, $values:expr) => {
        $crate::sandbox::Call {
            nr: ::libc::$name,
            name: $crate::sandbox::strip_sys(stringify!($name)),
            only: $crate::sandbox::Only::Arg($arg, $values),
        }
    };
}
pub use call;

/// "SYS_read" → "read" at compile time.
pub const fn strip_sys(s: &'static str) -> &'static str {
    match s.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(r) => r,
            Err(_) => s,
        },
        _ => s,
    }
}

/// ioctl request numbers (Linux's _IO/_IOR/_IOW/_IOWR encoding).
pub mod ioctl {
    use std::mem::size_of;

    const fn enc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
    }
    const KVMIO: u64 = 0xAE;
    const W: u64 = 1;
    const R: u64 = 2;

    pub const KVM_RUN: u64 = enc(0, KVMIO, 0x80, 0);
    pub const KVM_GET_REGS: u64 = enc(R, KVMIO, 0x81, size_of::<kvm_bindings::kvm_regs>());
    pub const KVM_SET_GSI_ROUTING: u64 =
        enc(W, KVMIO, 0x6a, size_of::<kvm_bindings::kvm_irq_routing>());
    pub const KVM_IRQFD: u64 = enc(W, KVMIO, 0x76, size_of::<kvm_bindings::kvm_irqfd>());
    pub const KVM_IOEVENTFD: u64 = enc(W, KVMIO, 0x79, size_of::<kvm_bindings::kvm_ioeventfd>());
    pub const KVM_SET_USER_MEMORY_REGION: u64 = enc(
        W,
        KVMIO,
        0x46,
        size_of::<kvm_bindings::kvm_userspace_memory_region>(),
    );
    pub const KVM_SIGNAL_MSI: u64 = enc(W, KVMIO, 0xa5, size_of::<kvm_bindings::kvm_msi>());
    pub const KVM_IRQ_LINE: u64 = enc(W, KVMIO, 0x61, size_of::<kvm_bindings::kvm_irq_level>());

    pub const TUNSETIFF: u64 = enc(W, b'T' as u64, 202, size_of::<i32>());
    pub const TUNSETOFFLOAD: u64 = enc(W, b'T' as u64, 208, size_of::<u32>());
    pub const TUNSETVNETHDRSZ: u64 = enc(W, b'T' as u64, 216, size_of::<i32>());
    pub const SIOCGIFFLAGS: u64 = 0x8913;
    pub const FIONBIO: u64 = libc::FIONBIO;
    pub const FIOCLEX: u64 = libc::FIOCLEX;
    pub const TCGETS: u64 = libc::TCGETS;
    pub const TCSETS: u64 = libc::TCSETS;
    pub const BLKGETSIZE64: u64 = enc(R, 0x12, 114, size_of::<usize>());
}

use ioctl::*;

/// What every thread does whatever its job, once its filter is on: allocate, lock, log, end
/// (thread exit unmaps the signal stack, releases the stack, blocks signals), and the crash
/// path (say why, wake the main thread, wait on a futex, exit). What a thread does before its
/// filter (the C library's thread start) runs under the launcher's filter, not this one.
pub const COMMON: &[Call] = &[
    call!(SYS_brk),
    call!(SYS_mmap, noexec),
    call!(SYS_mprotect, noexec),
    call!(SYS_munmap),
    call!(SYS_mremap),
    call!(SYS_madvise),
    call!(SYS_futex),
    call!(SYS_write),
    call!(SYS_close),
    call!(SYS_clock_gettime),
    call!(SYS_sched_yield),
    call!(SYS_rt_sigprocmask),
    call!(SYS_rt_sigreturn),
    call!(SYS_sigaltstack),
    call!(SYS_exit),
    call!(SYS_exit_group),
];

/// fcntl commands any thread may use on its own fds (duplicating, flags, seals of guest
/// memory); never locks.
const FCNTL: &[u64] = &[
    libc::F_DUPFD_CLOEXEC as u64,
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_GET_SEALS as u64,
];

/// FCNTL, and the open file description locks disk images take (src/image_lock.rs): for a
/// thread that opens disks.
const FCNTL_LOCKS: &[u64] = &[
    libc::F_DUPFD_CLOEXEC as u64,
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_GET_SEALS as u64,
    libc::F_OFD_GETLK as u64,
    libc::F_OFD_SETLK as u64,
];

/// The ioctls a thread that plugs or moves device resources uses (KVM's VM fd).
const KVM_WIRING: [u64; 5] = [
    KVM_IOEVENTFD,
    KVM_IRQFD,
    KVM_SET_GSI_ROUTING,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SIGNAL_MSI,
];

/// A vCPU: KVM_RUN and the exits it handles itself (MSI-X and BAR moves rewire KVM; a
/// driver's DRIVER_OK starts device workers through the launcher; character output).
pub const VCPU: Allow = Allow {
    kind: "vcpu",
    calls: &[
        call!(SYS_ioctl, 1, &{
            let w = KVM_WIRING;
            [
                KVM_RUN,
                KVM_GET_REGS,
                KVM_IRQ_LINE,
                w[0],
                w[1],
                w[2],
                w[3],
                w[4],
            ]
        }),
        call!(SYS_eventfd2),
        call!(SYS_sendto),
        call!(SYS_fcntl, 1, FCNTL),
    ],
    on_vcpu: &[],
};

/// The caller's thread while the VM runs, and its teardown: signals, terminal, stdout,
/// kicking and joining vCPUs, removing sockets.
pub const MAIN: Allow = Allow {
    kind: "main",
    calls: &[
        call!(SYS_poll),
        call!(SYS_ppoll),
        call!(SYS_read),
        call!(SYS_ioctl, 1, &[TCGETS, TCSETS, FIONBIO]),
        call!(SYS_tgkill),
        call!(SYS_getpid),
        call!(SYS_clock_nanosleep),
        call!(SYS_unlink),
        call!(SYS_fcntl, 1, FCNTL),
        call!(SYS_sendto),
        call!(SYS_rt_sigaction),
        call!(SYS_shutdown),
        call!(SYS_epoll_ctl),
    ],
    on_vcpu: &[],
};

/// The machine-file watcher: inotify on the file's directory, non-blocking reads of the file.
pub const WATCHER: Allow = Allow {
    kind: "watcher",
    calls: &[
        call!(SYS_ppoll),
        call!(SYS_poll),
        call!(SYS_read),
        call!(SYS_pread64),
        call!(SYS_openat),
        call!(SYS_statx),
        call!(SYS_newfstatat),
        call!(SYS_fstat),
        call!(SYS_lseek),
        call!(SYS_inotify_add_watch),
        call!(SYS_inotify_rm_watch),
        call!(SYS_clock_nanosleep),
        call!(SYS_fcntl, 1, FCNTL),
    ],
    on_vcpu: &[],
};

/// The reconciler: re-checks the file (reads the files it names), opens TAPs and disk images
/// (locking them), connects to vhost-user back ends and negotiates with them (socket timeouts,
/// messages with descriptors), wires plugged functions into KVM, kicks vCPUs.
pub const RECONCILER: Allow = Allow {
    kind: "reconciler",
    calls: &[
        call!(SYS_openat),
        call!(SYS_read),
        call!(SYS_pread64),
        call!(SYS_statx),
        call!(SYS_newfstatat),
        call!(SYS_fstat),
        call!(SYS_lseek),
        call!(SYS_readlink),
        call!(SYS_getcwd),
        call!(SYS_socket, 0, &[libc::AF_UNIX as u64, libc::AF_INET as u64]),
        call!(SYS_ioctl, 1, &{
            let w = KVM_WIRING;
            [
                TUNSETIFF,
                TUNSETOFFLOAD,
                TUNSETVNETHDRSZ,
                SIOCGIFFLAGS,
                FIONBIO,
                FIOCLEX,
                BLKGETSIZE64,
                w[0],
                w[1],
                w[2],
                w[3],
                w[4],
            ]
        }),
        call!(SYS_eventfd2),
        call!(SYS_fcntl, 1, FCNTL_LOCKS),
        call!(SYS_tgkill),
        call!(SYS_getpid),
        call!(SYS_getrandom),
        call!(SYS_clock_nanosleep),
        call!(SYS_poll),
        call!(SYS_sendto),
        call!(SYS_epoll_ctl),
        call!(SYS_connect),
        call!(SYS_setsockopt),
        call!(SYS_sendmsg),
        call!(SYS_recvmsg),
    ],
    on_vcpu: &[],
};

/// The control socket's accept thread, and one thread per client.
pub const CONTROL: Allow = Allow {
    kind: "control",
    calls: &[
        call!(SYS_accept4),
        call!(SYS_poll),
        call!(SYS_recvfrom),
        call!(SYS_sendto),
        call!(SYS_getsockopt),
        call!(SYS_setsockopt),
        call!(SYS_shutdown),
        call!(SYS_fcntl, 1, FCNTL),
    ],
    on_vcpu: &[],
};

/// A character device's socket backend: accept one client, read its input.
pub const CHAR_SOCKET: Allow = Allow {
    kind: "char-socket",
    calls: &[
        call!(SYS_accept4),
        call!(SYS_poll),
        call!(SYS_read),
        call!(SYS_recvfrom),
        call!(SYS_sendto),
        call!(SYS_getsockopt),
        call!(SYS_shutdown),
        call!(SYS_clock_nanosleep),
        call!(SYS_ioctl, 1, &[FIONBIO]),
        call!(SYS_fcntl, 1, FCNTL),
    ],
    on_vcpu: &[],
};

/// What every device worker does besides its own I/O: wait on its eventfds, signal irqfds.
pub const WORKER_BASE: &[Call] = &[
    call!(SYS_epoll_create1),
    call!(SYS_epoll_ctl),
    call!(SYS_epoll_wait),
    call!(SYS_read),
    call!(SYS_poll),
    call!(SYS_fcntl, 1, FCNTL),
];

/// Starting threads (the launcher), what a new thread does before its own filter (the C
/// library's and std's thread start), and installing that filter.
pub const SPAWN: &[Call] = &[
    call!(SYS_clone),
    call!(SYS_clone3),
    call!(SYS_sched_getaffinity),
    call!(SYS_gettid),
    call!(SYS_set_robust_list),
    call!(SYS_rseq),
    call!(SYS_prctl),
    call!(SYS_seccomp),
];

/// `vmm device <kind>`: the vhost-user protocol (fds passed with the messages, guest memory
/// mapped from them, eventfds), the backend crate's threads, and the unix sockets it serves
/// on (its socket, and the relay's private one). One filter for the whole process, installed
/// once the device's own files are open.
pub const DAEMON: Allow = Allow {
    kind: "vhost-user daemon",
    calls: &[
        call!(SYS_accept4),
        call!(SYS_recvmsg),
        call!(SYS_sendmsg),
        call!(SYS_recvfrom),
        call!(SYS_sendto),
        call!(SYS_shutdown),
        call!(SYS_getsockopt),
        call!(SYS_read),
        call!(SYS_fstat),
        call!(SYS_statx),
        call!(SYS_newfstatat),
        call!(SYS_unlink),
        call!(SYS_rmdir),
        call!(SYS_mkdir),
        call!(SYS_chmod),
        call!(SYS_socket, 0, &[libc::AF_UNIX as u64]),
        call!(SYS_bind),
        call!(SYS_listen),
        call!(SYS_connect),
        call!(SYS_poll),
        call!(SYS_ppoll),
        call!(SYS_eventfd2),
        call!(SYS_epoll_create1),
        call!(SYS_epoll_ctl),
        call!(SYS_epoll_wait),
        call!(SYS_epoll_pwait),
        call!(SYS_rt_sigaction),
        call!(SYS_tgkill),
        call!(SYS_getpid),
        call!(SYS_gettid),
        call!(SYS_getrandom),
        call!(SYS_clock_nanosleep),
        call!(SYS_sched_getaffinity),
        call!(SYS_ioctl, 1, &[FIONBIO, FIOCLEX, TCSETS]),
        call!(SYS_fcntl, 1, FCNTL),
        call!(SYS_clone),
        call!(SYS_clone3),
        call!(SYS_set_robust_list),
        call!(SYS_rseq),
        call!(SYS_prctl),
    ],
    on_vcpu: &[],
};

/// The thread kinds vmm itself runs (device workers come from the registry).
pub const OWN: &[&Allow] = &[&VCPU, &MAIN, &WATCHER, &RECONCILER, &CONTROL, &CHAR_SOCKET];

/// The list of a device kind without worker threads (the legacy devices run on vCPUs).
pub const NO_WORKER: Allow = Allow {
    kind: "none",
    calls: &[],
    on_vcpu: &[],
};
