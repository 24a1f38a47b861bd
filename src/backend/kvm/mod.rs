//! The KVM backend: the only place that talks to /dev/kvm.
//!
//! `run(graph)` builds the VM the device graph describes — memory, in-kernel irqchip with
//! IOAPIC-only interrupt routing (no PIC/PIT path, see docs/architecture.md), vCPUs, ACPI
//! tables, the kernel, the devices — runs it with the guest console on the terminal, and
//! returns how it ended.
//!
//! Threads: one per vCPU (exits are handled on the vCPU's own thread, under the bus read lock
//! and the device's mutex), one per socket backend, and the caller's thread, which waits for the
//! outcome, signals (SIGINT, SIGTERM, SIGHUP) and terminal input. Lock order: bus, then device.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod handle;
pub mod live;
pub mod memory;
pub mod vcpu;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::terminal::{EscapeDecoder, RawMode};
use crate::graph::DeviceGraph;
use crate::graph::layout::{
    ACPI_PM_PIO, IOAPIC_START, PCI_CONFIG_PIO, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_HOTPLUG_PIO,
};
use crate::hw::bus::{Bus, SharedDevice};
use crate::hw::char_io::{self, CharInput, CharIo, CharOut, SocketGuard};
use crate::hw::hotplug::{Hotplug, HotplugPorts};
use crate::hw::pci::{PciConfigIo, PciEcam, PciRoot, SharedFunction};
use crate::hw::platform::AcpiPm;
use crate::hw::virtio::GuestMem;
use crate::hw::{DeviceError, Irq, Machine, VmControl, VmHandle};
use crate::sync::{Mutex, Rank, RwLock};
use handle::{Handle, IOAPIC_PINS, KvmHandle};
pub use live::LiveVm;
use live::{Plugged, attach_pci};
pub use vcpu::Outcome;
use vcpu::{ExitState, VcpuShared};

/// KVM's TSS needs three pages below 4 GiB, outside RAM and MMIO.
const TSS_ADDR: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks {0}, which vmm needs")]
    MissingCap(&'static str),
    #[error("The machine has {want} vCPUs; KVM allows at most {max} here")]
    TooManyVcpus { want: u32, max: usize },
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("Device `{name}`: {source}")]
    Device {
        name: String,
        #[source]
        source: DeviceError,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// How a run ended, and how long it took.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: Outcome,
    pub elapsed: Duration,
}

/// An interrupt line backed by an irqfd: writing the eventfd asserts the IOAPIC pin (edge).
struct IrqFd(EventFd);

impl Irq for IrqFd {
    fn trigger(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("raising an interrupt failed: {e}");
        }
    }
}

/// The VM as devices see it while they are built.
struct Builder<'a> {
    vm: &'a VmFd,
    machine: &'a str,
    handle: Arc<KvmHandle>,
    mem: GuestMem,
    pci: Arc<Mutex<PciRoot>>,
    pio: Bus,
    mmio: Arc<RwLock<Bus>>,
    irqs: HashMap<u8, Arc<IrqFd>>,
    exit: Arc<ExitState>,
    base_dir: PathBuf,
    ram: (u64, u64),
    stdin: Option<Arc<dyn CharInput>>,
    /// Every character device's input side (the main loop's periodic `unstick`).
    inputs: Vec<Arc<dyn CharInput>>,
    sockets: Vec<SocketGuard>,
    plugged: HashMap<u8, Plugged>,
    outputs: Vec<(String, Arc<std::sync::atomic::AtomicU64>)>,
}

impl Machine for Builder<'_> {
    fn machine_name(&self) -> &str {
        self.machine
    }

    fn irq_line(&mut self, pin: u8) -> Result<Arc<dyn Irq>, DeviceError> {
        if u32::from(pin) >= IOAPIC_PINS {
            return Err(DeviceError(format!("IOAPIC pin {pin} does not exist")));
        }
        if let Some(l) = self.irqs.get(&pin) {
            return Ok(l.clone());
        }
        let evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError(format!("eventfd: {e}")))?;
        self.vm
            .register_irqfd(&evt, u32::from(pin))
            .map_err(|e| DeviceError(format!("KVM_IRQFD for pin {pin}: {e}")))?;
        let l = Arc::new(IrqFd(evt));
        self.irqs.insert(pin, l.clone());
        Ok(l)
    }

    fn vm_control(&self) -> Arc<dyn VmControl> {
        self.exit.clone()
    }

    fn add_pio(&mut self, base: u16, len: u16, dev: SharedDevice) -> Result<(), DeviceError> {
        self.pio
            .insert(u64::from(base), u64::from(len), dev)
            .map_err(|e| DeviceError(e.to_string()))
    }

    fn ram(&self) -> (u64, u64) {
        self.ram
    }

    fn base_dir(&self) -> &std::path::Path {
        &self.base_dir
    }

    fn vm_handle(&self) -> Arc<dyn VmHandle> {
        Arc::new(Handle(self.handle.clone()))
    }

    fn guest_memory(&self) -> GuestMem {
        self.mem.clone()
    }

    fn add_pci(
        &mut self,
        slot: u8,
        function: SharedFunction,
        bar: (u64, u64),
        bar_device: SharedDevice,
    ) -> Result<(), DeviceError> {
        attach_pci(
            &self.pci,
            &self.mmio,
            slot,
            function.clone(),
            bar,
            bar_device.clone(),
        )?;
        self.plugged.insert(
            slot,
            Plugged {
                function,
                bar_device,
            },
        );
        Ok(())
    }

    fn open_char(
        &mut self,
        name: &str,
        io: &CharIo,
        input: Arc<dyn CharInput>,
    ) -> Result<CharOut, DeviceError> {
        if *io == CharIo::Stdio {
            self.stdin = Some(input.clone());
        }
        self.inputs.push(input.clone());
        let (out, guard) =
            char_io::open(io, &self.base_dir, input).map_err(|e| DeviceError(e.to_string()))?;
        self.sockets.extend(guard);
        if let Some(c) = out.dropped() {
            self.outputs.push((name.to_string(), c));
        }
        Ok(out)
    }
}

/// Builds and runs the machine; returns when the VM has ended and every vCPU thread is gone.
pub fn run(graph: &DeviceGraph) -> Result<RunReport, VmError> {
    run_with(graph, |_| None)
}

/// What [`run_with`]'s caller keeps alive while the VM runs (dropped when it ends).
pub type Guard = Box<dyn std::any::Any>;

/// [`run`], handing the running VM to `on_start` once its vCPUs run; what it returns is
/// dropped when the VM has ended, before the devices are.
pub fn run_with(
    graph: &DeviceGraph,
    on_start: impl FnOnce(Arc<LiveVm>) -> Option<Guard>,
) -> Result<RunReport, VmError> {
    let started = Instant::now();
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
        (Cap::UserMemory, "user memory (KVM_CAP_USER_MEMORY)"),
        (Cap::IrqRouting, "IRQ routing (KVM_CAP_IRQ_ROUTING)"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    let max = kvm.get_max_vcpus();
    if graph.vcpus as usize > max {
        return Err(VmError::TooManyVcpus {
            want: graph.vcpus,
            max,
        });
    }

    log::debug!("kvm opened: {:?}", started.elapsed());
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    // Guest RAM first: registered after the irqchip, the memory slot costs 5-7 ms here.
    let mem = memory::create(graph)?;
    memory::register(&vm, &mem)?;
    log::debug!("memory: {:?}", started.elapsed());
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let mmio = Arc::new(RwLock::new(Rank::Bus, Bus::new()));
    let handle =
        KvmHandle::new(vm.clone(), mmio.clone()).map_err(kvm_err("KVM_SET_GSI_ROUTING"))?;

    log::debug!("vm and irqchip: {:?}", started.elapsed());

    let tables = acpi::build(graph, boot::ACPI_START, boot::ACPI_SIZE)?;
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|_| boot::BootError::Write {
                addr: *addr,
                what: "ACPI tables",
            })?;
    }
    let entry = boot::load(&mem, graph, tables.rsdp_addr)?;
    log::debug!("acpi and kernel loaded: {:?}", started.elapsed());

    let exit = Arc::new(ExitState::new().map_err(io_err("eventfd"))?);
    let below = graph
        .regions
        .iter()
        .filter(|r| r.ram && r.start < IOAPIC_START)
        .map(|r| r.size)
        .sum();
    let root = Arc::new(Mutex::new(Rank::PciRoot, PciRoot::new()));
    let root_for_live = root.clone();
    let mut b = Builder {
        vm: &vm,
        machine: &graph.machine,
        handle: handle.clone(),
        mem: mem.clone(),
        pci: root.clone(),
        pio: Bus::new(),
        mmio: mmio.clone(),
        irqs: HashMap::new(),
        exit: exit.clone(),
        base_dir: graph.base_dir.clone(),
        ram: (below, graph.memory - below),
        stdin: None,
        inputs: Vec::new(),
        sockets: Vec::new(),
        plugged: HashMap::new(),
        outputs: Vec::new(),
    };
    let platform: [(u64, u64, SharedDevice, &str); 2] = [
        (
            u64::from(PCI_CONFIG_PIO.0),
            u64::from(PCI_CONFIG_PIO.1),
            Arc::new(Mutex::new(Rank::BusDevice, PciConfigIo::new(root.clone()))),
            "pci-config",
        ),
        (
            u64::from(ACPI_PM_PIO.0),
            u64::from(ACPI_PM_PIO.1),
            Arc::new(Mutex::new(Rank::BusDevice, AcpiPm::new(exit.clone()))),
            "acpi-pm",
        ),
    ];
    for (base, len, dev, name) in platform {
        b.pio.insert(base, len, dev).map_err(|e| VmError::Device {
            name: name.into(),
            source: DeviceError(e.to_string()),
        })?;
    }
    let hotplug = match graph.hotplug_irq {
        Some(pin) => {
            let irq = b.irq_line(pin).map_err(|source| VmError::Device {
                name: "pci-hotplug".into(),
                source,
            })?;
            let slots = graph.hotplug_slots().fold(0u32, |m, s| {
                m | 1u32.checked_shl(u32::from(s.slot)).unwrap_or(0)
            });
            let hp = Hotplug::new(slots, irq);
            b.pio
                .insert(
                    u64::from(PCI_HOTPLUG_PIO.0),
                    u64::from(PCI_HOTPLUG_PIO.1),
                    Arc::new(Mutex::new(Rank::BusDevice, HotplugPorts(hp.clone()))),
                )
                .map_err(|e| VmError::Device {
                    name: "pci-hotplug".into(),
                    source: DeviceError(e.to_string()),
                })?;
            Some(hp)
        }
        None => None,
    };
    b.mmio
        .write()
        .insert(
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
            Arc::new(Mutex::new(Rank::BusDevice, PciEcam::new(root))),
        )
        .map_err(|e| VmError::Device {
            name: "pci-ecam".into(),
            source: DeviceError(e.to_string()),
        })?;
    for d in &graph.devices {
        d.spec
            .device()
            .build(&d.placement, &mut b)
            .map_err(|source| VmError::Device {
                name: d.name.clone(),
                source,
            })?;
    }
    let Builder {
        pio,
        stdin,
        inputs,
        sockets,
        plugged,
        ram,
        outputs,
        ..
    } = b;
    if let Some(hp) = &hotplug {
        for &slot in plugged.keys() {
            hp.set_present(slot);
        }
    }
    let live = Arc::new(LiveVm {
        machine: graph.machine.clone(),
        base_dir: graph.base_dir.clone(),
        ram,
        handle: handle.clone(),
        mem: mem.clone(),
        pci: root_for_live,
        mmio: mmio.clone(),
        exit: exit.clone(),
        hotplug,
        plugged: Mutex::new(Rank::Plugged, plugged),
        outputs,
    });

    // vCPUs: CPU state for all, boot registers for the first. The others wait for INIT/SIPI.
    let template = cpu::CpuTemplate::new(&kvm, graph.vcpus, &graph.cpu_hide)?;
    let mut fds = Vec::new();
    for id in 0..graph.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        template.configure(id, &fd)?;
        if id == 0 {
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            let (regs, sregs) = boot::boot_registers(&entry, sregs);
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        fds.push(fd);
    }

    log::debug!("vcpus configured: {:?}", started.elapsed());
    // Signals go to a signalfd of this thread; vCPU threads inherit the blocked mask.
    let sigfd = SignalFd::new().map_err(io_err("signalfd"))?;
    vcpu::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
    let shared = VcpuShared {
        pio: Arc::new(RwLock::new(Rank::Bus, pio)),
        mmio,
        exit: exit.clone(),
        handle,
    };
    // Raw mode before the guest runs: its first output and the user's first keys (Ctrl-C
    // included) belong to the guest, not to the terminal's line discipline.
    let raw = stdin
        .as_ref()
        .and_then(|_| RawMode::enter(libc::STDIN_FILENO));
    let mut threads = Vec::new();
    for (id, fd) in fds.into_iter().enumerate() {
        match vcpu::spawn(id as u32, fd, shared.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                exit.finish(Outcome::Failed(format!(
                    "cannot start vCPU thread {id}: {e}"
                )));
                break;
            }
        }
    }
    log::info!(
        "{}: {} vCPUs running, set up in {:?}",
        graph.machine,
        threads.len(),
        started.elapsed()
    );

    {
        let guard = if threads.len() == graph.vcpus as usize {
            on_start(live)
        } else {
            None
        };
        wait(&exit, &sigfd, stdin.as_deref(), &inputs, raw.is_some());
        drop(guard);
        stop_vcpus(&exit, threads);
        drop(raw);
    }
    // The guest's last words, if stdout takes them soon.
    if let Some(o) = char_io::stdout_in_use() {
        o.finish(Duration::from_millis(500));
    }
    drop(sockets);
    let outcome = exit
        .outcome()
        .unwrap_or(Outcome::Stopped("no outcome".into()));
    Ok(RunReport {
        outcome,
        elapsed: started.elapsed(),
    })
}

/// Kicks vCPU threads out of KVM_RUN until all have returned.
fn stop_vcpus(exit: &ExitState, threads: Vec<std::thread::JoinHandle<()>>) {
    use std::os::unix::thread::JoinHandleExt;
    exit.stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last_kick: Option<Instant> = None;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        // Kick (again every 10 ms: a kick can land just before a thread enters KVM_RUN).
        if last_kick.is_none_or(|k| k.elapsed() > Duration::from_millis(10)) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the thread is alive (not finished, not joined): its pthread_t is valid.
                unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
            }
            last_kick = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    for t in threads {
        if t.is_finished() {
            let _ = t.join();
        } else {
            log::error!("a vCPU thread did not stop within 5 s; leaving it");
        }
    }
}

/// Waits for the outcome while serving signals and terminal input.
fn wait(
    exit: &ExitState,
    sigfd: &SignalFd,
    stdin: Option<&dyn CharInput>,
    inputs: &[Arc<dyn CharInput>],
    tty: bool,
) {
    use std::os::fd::AsRawFd;
    let mut decoder = EscapeDecoder::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut stdin_open = stdin.is_some();
    let mut next_look = Instant::now() + char_io::UNSTICK_PERIOD;
    // Guest output that stdout did not take at once (never written on a vCPU's time).
    let out = char_io::stdout_in_use();
    loop {
        if exit.outcome().is_some() {
            return;
        }
        if let Some(input) = stdin
            && !pending.is_empty()
        {
            let n = input.push(&pending);
            pending.drain(..n);
        }
        if Instant::now() >= next_look {
            for i in inputs {
                i.unstick();
            }
            next_look = Instant::now() + char_io::UNSTICK_PERIOD;
        }
        let mut fds = vec![
            libc::pollfd {
                fd: exit.evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd.fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if let Some(o) = &out {
            fds.push(libc::pollfd {
                fd: o.wake(),
                events: libc::POLLIN,
                revents: 0,
            });
            // Polled only while output waits (a closed pipe would report POLLERR forever).
            fds.push(libc::pollfd {
                fd: if o.has_pending() { o.fd() } else { -1 },
                events: libc::POLLOUT,
                revents: 0,
            });
        }
        let stdin_at = fds.len();
        let poll_stdin = stdin_open && pending.is_empty();
        if poll_stdin {
            fds.push(libc::pollfd {
                fd: libc::STDIN_FILENO,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let until_look = next_look
            .saturating_duration_since(Instant::now())
            .as_millis() as i32;
        let timeout = if pending.is_empty() {
            until_look.max(1)
        } else {
            until_look.clamp(1, 10)
        };
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            continue; // EINTR
        }
        if fds[1].revents & libc::POLLIN != 0
            && let Some(sig) = sigfd.read()
        {
            exit.finish(Outcome::Stopped(signal_name(sig).into()));
            return;
        }
        if let Some(o) = &out
            && (fds[2].revents != 0 || fds[3].revents != 0)
        {
            o.flush_some();
        }
        if poll_stdin && fds[stdin_at].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
            let mut buf = [0u8; 4096];
            // SAFETY: reading into a buffer we own, of its length.
            let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                stdin_open = false; // EOF or error: the guest just gets no more input
                continue;
            }
            let bytes = &buf[..n as usize];
            if tty {
                let keys = decoder.feed(bytes);
                pending.extend(keys.to_guest);
                if keys.stop {
                    exit.finish(Outcome::Stopped("console escape (Ctrl-A x)".into()));
                    return;
                }
            } else {
                pending.extend_from_slice(bytes);
            }
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// SIGINT, SIGTERM and SIGHUP, blocked and read from a signalfd.
struct SignalFd {
    fd: i32,
    old_mask: libc::sigset_t,
}

impl SignalFd {
    fn new() -> std::io::Result<SignalFd> {
        // SAFETY: sigset operations on sets we own; pthread_sigmask on the calling thread;
        // signalfd returns a new fd we own (closed in Drop).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            let mut old_mask: libc::sigset_t = std::mem::zeroed();
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(SignalFd { fd, old_mask })
        }
    }

    fn read(&self) -> Option<i32> {
        // SAFETY: reading one signalfd_siginfo into a struct we own.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                self.fd,
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size_of::<libc::signalfd_siginfo>(),
            );
            (n == size_of::<libc::signalfd_siginfo>() as isize).then_some(info.ssi_signo as i32)
        }
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: closing our fd and restoring this thread's previous mask.
        unsafe {
            libc::close(self.fd);
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut());
        }
    }
}
