//! The `vmm` command line. Exit codes: 0 success, 1 runtime failure, 2 bad machine file.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use vmm::diag::Report;
use vmm::graph::diff::{self, Class, Side};

/// A declarative virtual machine launcher: the machine file is the VM.
#[derive(Parser)]
#[command(name = "vmm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check a machine file and print every problem in it.
    Check {
        file: PathBuf,
        /// How to print diagnostics.
        #[arg(long, value_enum, default_value = "human")]
        message_format: Format,
    },
    /// Print the JSON Schema of machine files.
    Schema,
    /// Print the device graph a machine file lowers to.
    Graph {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Show what changes from one machine file to another, and which a running VM can take.
    /// With one file: what applying it to the running VM of that machine would do.
    Plan {
        old: PathBuf,
        new: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
        /// The running VM's control socket (default: derived from the machine's name).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Boot the machine with its console on this terminal. While it runs, saving the file
    /// applies the edit to the VM (hot-plugging NICs); see docs/hotplug.md.
    Up {
        file: PathBuf,
        /// Do not follow edits of the file (`vmm apply` still works).
        #[arg(long)]
        no_watch: bool,
        /// Seccomp filters on every thread: `on` kills vmm on a system call a thread's
        /// allowlist lacks (naming both), `log` lets it through and has the kernel log it
        /// (dmesg), `off` installs none. See docs/security.md.
        #[arg(long, value_enum, default_value = "on")]
        seccomp: Seccomp,
        /// Landlock: limit the whole process to the files the machine file names, its
        /// directory, the runtime directory, /dev/kvm and /dev/net/tun (edits that name new
        /// files are then refused). See docs/security.md.
        #[arg(long)]
        landlock: bool,
        /// Guest RAM as private anonymous memory instead of a sealed memfd mapped shared
        /// (vhost-user devices need the shared memfd; see docs/performance.md for the cost).
        #[arg(long)]
        private_ram: bool,
    },
    /// Show a running VM's devices, hotplug slots and pending unplugs.
    Status {
        /// The machine's name or file (default: the only running VM).
        machine: Option<String>,
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Apply a machine file to its running VM now (as saving it does).
    Apply {
        file: PathBuf,
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Stop a running VM.
    Stop {
        /// The machine's name or file (default: the only running VM).
        machine: Option<String>,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Serve one device model as a vhost-user backend on a unix socket (until the VMM
    /// disconnects). Each kind's options are the keys of its machine-file table.
    #[command(subcommand_required = true)]
    Device {
        /// Accept guest memory the front end has not sealed against shrinking (a front end
        /// that truncates it then crashes this backend; QEMU's memory-backend-memfd seals).
        #[arg(long, global = true)]
        allow_unsealed_memory: bool,
        /// Seccomp filter on the backend (as for `vmm up`).
        #[arg(long, value_enum, default_value = "on", global = true)]
        seccomp: Seccomp,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Seccomp {
    On,
    Log,
    Off,
}

impl Seccomp {
    fn mode(self) -> vmm::sandbox::Mode {
        match self {
            Seccomp::On => vmm::sandbox::Mode::Trap,
            Seccomp::Log => vmm::sandbox::Mode::Log,
            Seccomp::Off => vmm::sandbox::Mode::Off,
        }
    }
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_BAD_FILE: u8 = 2;

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    vmm::logging::init();
    // `vmm device <kind>` and its options come from the device registry.
    let matches = Cli::command()
        .mut_subcommand("device", |d| {
            d.subcommands(vmm::vhost_user::cli::subcommands())
        })
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Some(("device", d)) = matches.subcommand() {
        let code = device(d);
        vmm::logging::flush();
        return code;
    }
    let code = run(cli);
    vmm::logging::flush();
    code
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check {
            file,
            message_format,
        } => check(&file, message_format),
        Command::Schema => {
            print!("{}", vmm::spec::schema::render());
            ExitCode::SUCCESS
        }
        Command::Graph { file, format } => graph(&file, format),
        Command::Plan {
            old,
            new: Some(new),
            format,
            ..
        } => plan(&old, &new, format),
        Command::Plan {
            old,
            new: None,
            format,
            socket,
        } => remote_edit(&old, socket, format, false),
        Command::Apply {
            file,
            socket,
            format,
        } => remote_edit(&file, socket, format, true),
        Command::Status {
            machine,
            socket,
            format,
        } => status(machine.as_deref(), socket, format),
        Command::Stop { machine, socket } => stop(machine.as_deref(), socket),
        Command::Up {
            file,
            no_watch,
            seccomp,
            landlock,
            private_ram,
        } => {
            vmm::backend::kvm::memory::set_private(private_ram);
            up(&file, !no_watch, seccomp.mode(), landlock)
        }
        Command::Device { .. } => unreachable!("handled in main"),
    }
}

/// Prints a report on stderr: graphical when a person reads it, JSON when asked.
fn emit(report: &Report, format: Format) {
    if report.diags.is_empty() {
        return;
    }
    match format {
        Format::Json => {
            for d in report.json() {
                println!("{}", serde_json::to_string(&d).unwrap_or_default());
            }
            if let Some(l) = report.omitted_line() {
                let (errors, warnings) = report.omitted;
                println!(
                    "{}",
                    serde_json::json!({ "omitted": { "errors": errors, "warnings": warnings }, "message": l })
                );
            }
        }
        Format::Human => {
            let tty = std::io::stderr().is_terminal();
            let color = tty && std::env::var_os("NO_COLOR").is_none();
            // COLUMNS wins where it is set (also when stderr is a file or a pipe).
            let width = terminal_width().unwrap_or(100);
            eprint!("{}", report.render(color, width));
            let (e, w) = (report.error_count(), report.total() - report.error_count());
            let name = report.source.name();
            match (e, w) {
                (0, w) => eprintln!("{name}: {w} warning{}", plural(w)),
                (e, 0) => eprintln!("{name}: {e} error{}", plural(e)),
                (e, w) => eprintln!("{name}: {e} error{}, {w} warning{}", plural(e), plural(w)),
            }
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn terminal_width() -> Option<usize> {
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok())
}

fn check(file: &Path, format: Format) -> ExitCode {
    match vmm::check_file(file) {
        Ok(c) => {
            emit(&c.warnings, format);
            if format == Format::Human {
                let g = &c.graph;
                println!(
                    "{}: ok (machine {}, {} vCPU{}, {}, {} device{})",
                    file.display(),
                    g.machine,
                    g.vcpus,
                    plural(g.vcpus as usize),
                    vmm::contract::units::human_size(g.memory),
                    g.devices.len(),
                    plural(g.devices.len())
                );
            }
            ExitCode::SUCCESS
        }
        Err(report) => {
            emit(&report, format);
            ExitCode::from(EXIT_BAD_FILE)
        }
    }
}

fn graph(file: &Path, format: Format) -> ExitCode {
    match vmm::check_file(file) {
        Ok(c) => {
            emit(&c.warnings, Format::Human);
            match format {
                Format::Human => print!("{}", c.graph.render()),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&c.graph).unwrap_or_default()
                ),
            }
            ExitCode::SUCCESS
        }
        Err(report) => {
            emit(&report, Format::Human);
            ExitCode::from(EXIT_BAD_FILE)
        }
    }
}

fn plan(old: &Path, new: &Path, format: Format) -> ExitCode {
    let o = match vmm::check_file(old) {
        Ok(c) => c,
        Err(report) => {
            eprintln!("the old machine file is invalid:");
            emit(&report, Format::Human);
            return ExitCode::from(EXIT_BAD_FILE);
        }
    };
    let new_valid = match vmm::check_file(new) {
        Ok(c) => c.valid,
        Err(report) => {
            if format == Format::Json {
                println!(
                    "{}",
                    serde_json::json!({ "status": "invalid", "diagnostics": report.json() })
                );
            } else {
                println!("invalid: {} cannot be applied", new.display());
                emit(&report, Format::Human);
            }
            return ExitCode::from(EXIT_BAD_FILE);
        }
    };
    let plan = match diff::plan(&o.valid, &o.graph, &new_valid) {
        Ok((p, _)) => p,
        Err(diags) => {
            emit(&new_valid.loaded().report(diags), Format::Human);
            return ExitCode::from(EXIT_BAD_FILE);
        }
    };
    if format == Format::Json {
        println!(
            "{}",
            serde_json::json!({ "status": "ok", "changes": plan.changes })
        );
        return ExitCode::SUCCESS;
    }
    print_plan(&plan, o.valid.loaded(), new_valid.loaded());
    ExitCode::SUCCESS
}

/// `vmm plan` for people: each change with its class, then where restart-only changes are.
fn print_plan(plan: &diff::Plan, old: &vmm::spec::Loaded, new: &vmm::spec::Loaded) {
    if plan.is_empty() {
        println!("no changes");
        return;
    }
    let (hot, restart) = (plan.count(Class::HotApply), plan.count(Class::NeedsRestart));
    println!(
        "{} change{}: {hot} hot-apply, {restart} needs-restart",
        plan.changes.len(),
        plural(plan.changes.len())
    );
    for c in &plan.changes {
        let reason = c
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        println!(
            "  {:<13}  {}: {}{reason}",
            c.class.to_string(),
            c.subject,
            c.detail
        );
        if let Some(n) = &c.note {
            println!("  {:<13}    note: {n}", "");
        }
    }
    if hot > 0 && restart > 0 {
        println!(
            "a running VM would take none of these: the edit mixes live and restart-only changes"
        );
    }
    for (side, loaded) in [(Side::New, new), (Side::Old, old)] {
        let diags = plan.restart_diags(side);
        if !diags.is_empty() {
            let report = loaded.report(diags);
            let tty = std::io::stderr().is_terminal();
            eprint!(
                "{}",
                report.render(tty && std::env::var_os("NO_COLOR").is_none(), 100)
            );
        }
    }
}

/// Prints reconciler reports on stderr, where the terminal (in raw mode while the guest
/// console runs) needs "\r\n".
fn reporter() -> Box<dyn FnMut(&str) + Send> {
    let tty = std::io::stderr().is_terminal();
    Box::new(move |line: &str| {
        let nl = if tty { "\r\n" } else { "\n" };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "vmm: {line}{nl}");
    })
}

/// The control socket to talk to: `--socket`, the socket of a machine named on the command
/// line (or of the machine a file names), or the only one there is.
fn find_socket(machine: Option<&str>, socket: Option<PathBuf>) -> Result<PathBuf, String> {
    use vmm::reconcile::control;
    if let Some(s) = socket {
        return Ok(s);
    }
    if let Some(m) = machine {
        let p = Path::new(m);
        if p.is_file() {
            // The name is all that is needed: an otherwise invalid file still names its VM,
            // which then reports every problem in it.
            let bytes =
                vmm::spec::read_machine_file(p).map_err(|e| format!("cannot read {m}: {e}"))?;
            let text = String::from_utf8_lossy(&bytes);
            let format = vmm::spec::source::Format::of_path(p);
            let name = vmm::spec::source::parse(&text, format)
                .ok()
                .and_then(|d| d.value.get("name")?.as_str().map(str::to_string));
            return match name {
                Some(n) => Ok(control::socket_path(&n)),
                None => match vmm::spec::load_file(p) {
                    Err(r) => Err(format!(
                        "cannot tell which VM runs {m}: it names no machine:\n{}",
                        r.render(false, 100)
                    )),
                    Ok(l) => Ok(control::socket_path(&l.spec.name.to_string())),
                },
            };
        }
        return Ok(control::socket_path(m));
    }
    let dir = control::runtime_dir();
    let mut socks: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    socks.sort();
    // Sockets left by VMs that are gone do not count.
    let (live, stale): (Vec<PathBuf>, Vec<PathBuf>) =
        socks.into_iter().partition(|p| control::answers(p));
    let names = |ps: &[PathBuf]| {
        ps.iter()
            .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match live.len() {
        1 => Ok(live[0].clone()),
        0 if stale.is_empty() => Err(format!(
            "no running VM has a control socket in {}",
            dir.display()
        )),
        0 => Err(format!(
            "no running VM has a control socket in {} (left by VMs that are gone: {})",
            dir.display(),
            names(&stale)
        )),
        _ => Err(format!("several VMs run ({}): name one", names(&live))),
    }
}

fn call_vm(
    socket: &Path,
    req: &vmm::reconcile::control::Request,
) -> Result<vmm::reconcile::protocol::Answer, ExitCode> {
    use vmm::reconcile::protocol::{Answer, MessageKind};
    let answer = vmm::reconcile::control::call(socket, req).map_err(|e| {
        eprintln!("vmm: {e}");
        ExitCode::from(EXIT_RUNTIME)
    })?;
    // The VM could not take the request (busy, shutting down, a bad request).
    if let Answer::Message(m) = &answer
        && m.status == MessageKind::Error
    {
        eprintln!("vmm: {}", m.text);
        return Err(ExitCode::from(EXIT_RUNTIME));
    }
    Ok(answer)
}

/// An answer of another kind than the request asks for.
fn unexpected(a: &vmm::reconcile::protocol::Answer) -> ExitCode {
    eprintln!("vmm: unexpected answer from the VM: {}", a.to_line());
    ExitCode::from(EXIT_RUNTIME)
}

/// `vmm plan FILE` and `vmm apply FILE`: the running VM checks and plans the file itself.
fn remote_edit(file: &Path, socket: Option<PathBuf>, format: Format, apply: bool) -> ExitCode {
    use vmm::reconcile::control::Request;
    let bytes = match vmm::spec::read_machine_file(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("vmm: cannot read {}: {e}", file.display());
            return ExitCode::from(EXIT_BAD_FILE);
        }
    };
    // Too large or not UTF-8: said here, as `vmm check` says it (the VM would say the same).
    let text = match String::from_utf8(bytes) {
        Ok(t) if t.len() <= vmm::spec::MAX_FILE_SIZE => t,
        Ok(t) => return bad_file(file, t.into_bytes()),
        Err(e) => return bad_file(file, e.into_bytes()),
    };
    let sock = match find_socket(Some(&file.display().to_string()), socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_BAD_FILE);
        }
    };
    let path = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let req = if apply {
        Request::Apply { path, text }
    } else {
        Request::Plan { path, text }
    };
    let answer = match call_vm(&sock, &req) {
        Ok(a) => a,
        Err(c) => return c,
    };
    let vmm::reconcile::protocol::Answer::Edit(edit) = &answer else {
        return unexpected(&answer);
    };
    if format == Format::Json {
        println!("{}", answer.to_line());
    } else {
        println!("{}", edit.text);
    }
    match edit.status {
        vmm::reconcile::Verdict::Invalid => ExitCode::from(EXIT_BAD_FILE),
        vmm::reconcile::Verdict::NeedsRestart if apply => ExitCode::from(EXIT_RUNTIME),
        _ => ExitCode::SUCCESS,
    }
}

/// Reports why `bytes` (read from `file`) cannot be a machine file; exit 2.
fn bad_file(file: &Path, bytes: Vec<u8>) -> ExitCode {
    if let Err(report) = vmm::spec::load_bytes(file, bytes) {
        emit(&report, Format::Human);
    }
    ExitCode::from(EXIT_BAD_FILE)
}

fn status(machine: Option<&str>, socket: Option<PathBuf>, format: Format) -> ExitCode {
    let sock = match find_socket(machine, socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let answer = match call_vm(&sock, &vmm::reconcile::control::Request::Status) {
        Ok(a) => a,
        Err(c) => return c,
    };
    let vmm::reconcile::protocol::Answer::Status(a) = &answer else {
        return unexpected(&answer);
    };
    if format == Format::Json {
        println!("{}", answer.to_line());
        return ExitCode::SUCCESS;
    }
    println!("machine {} ({})", a.machine, a.file);
    println!("devices");
    for d in &a.devices {
        let place = match (d.slot, d.hotplug) {
            (Some(n), true) => format!("hotplug slot {n}"),
            (Some(n), false) => format!("slot {n}"),
            _ => "legacy".to_string(),
        };
        let mut st = kebab(&d.state);
        if let Some(secs) = d.pending_seconds {
            st = format!("{st} ({secs:.1} s)");
        }
        if let Some(e) = &d.error {
            st = format!("{st}: {e}");
        }
        if let Some(n) = d.output_dropped.filter(|&n| n > 0) {
            st = format!("{st}, {n} bytes of output dropped (its reader did not keep up)");
        }
        println!(
            "  {:<10} {:<14} {:<16} {st}",
            d.kind,
            format!("{:?}", d.name),
            place
        );
    }
    let slots: Vec<String> = a
        .hotplug_slots
        .iter()
        .map(|h| match &h.device {
            Some(dev) => format!("{} {} ({dev})", h.slot, kebab(&h.state)),
            None => format!("{} {}", h.slot, kebab(&h.state)),
        })
        .collect();
    println!(
        "hotplug slots: {} free of {}: {}",
        a.hotplug_free,
        slots.len(),
        if slots.is_empty() {
            "none".to_string()
        } else {
            slots.join(", ")
        }
    );
    println!("pending unplugs: {}", a.pending_unplugs.len());
    ExitCode::SUCCESS
}

/// A protocol enum as it is spelt on the wire ("plug-failed").
fn kebab(v: &impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn stop(machine: Option<&str>, socket: Option<PathBuf>) -> ExitCode {
    let sock = match find_socket(machine, socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match call_vm(&sock, &vmm::reconcile::control::Request::Stop) {
        Ok(vmm::reconcile::protocol::Answer::Message(m)) => {
            println!("{}", m.text);
            ExitCode::SUCCESS
        }
        Ok(other) => unexpected(&other),
        Err(c) => c,
    }
}

fn up(file: &Path, watch: bool, seccomp: vmm::sandbox::Mode, landlock: bool) -> ExitCode {
    use vmm::backend::kvm::{self, Outcome};
    let t = std::time::Instant::now();
    vmm::sandbox::crash_on_panic();
    vmm::sandbox::owner_only_umask();
    // The control socket's directory: refused when someone else could have planted it.
    if let Err(e) = vmm::sandbox::runtime_dir(&vmm::reconcile::control::runtime_dir()) {
        eprintln!("vmm: {e}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    // Early, so the launcher installs its filter while the file is checked; with Landlock,
    // once the files are known.
    if !landlock && let Err(e) = start_sandbox(seccomp) {
        return e;
    }
    let checked = match vmm::check_file(file) {
        Ok(c) => c,
        Err(report) => {
            emit(&report, Format::Human);
            return ExitCode::from(EXIT_BAD_FILE);
        }
    };
    // A back end that is not running is a warning for `vmm check`, but nothing to start.
    if checked
        .warnings
        .diags
        .iter()
        .any(|d| d.code == vmm::validate::NO_BACK_END)
    {
        let mut report = checked.warnings.clone();
        for d in &mut report.diags {
            if d.code == vmm::validate::NO_BACK_END {
                d.warning = false;
            }
        }
        emit(&report, Format::Human);
        return ExitCode::from(EXIT_BAD_FILE);
    }
    emit(&checked.warnings, Format::Human);
    log::debug!("machine file checked in {:?}", t.elapsed());
    if landlock {
        if let Err(e) = restrict_files(file, &checked) {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        // Now, so that the launcher (and every thread it starts) inherits the restriction.
        if let Err(e) = start_sandbox(seccomp) {
            return e;
        }
    }

    let g = &checked.graph;
    let path = file.to_path_buf();
    let follow = checked.clone();
    let socket = vmm::reconcile::control::socket_path(&g.machine);
    let start = move |live: std::sync::Arc<kvm::LiveVm>| -> Option<kvm::Guard> {
        let eject_to = live.clone();
        let (l, tx) =
            vmm::reconcile::Live::start(live, &path, follow, Some(socket), reporter(), watch);
        eject_to.on_eject(Box::new(move |bits| {
            let _ = tx.send(vmm::reconcile::Event::Ejected(bits));
        }));
        Some(Box::new(l))
    };
    match kvm::run_with(g, start) {
        Ok(r) => {
            let secs = r.elapsed.as_secs_f64();
            let (what, code) = match &r.outcome {
                Outcome::PowerOff => ("the guest powered off".to_string(), 0),
                Outcome::Reset => ("the guest reset the machine".to_string(), 0),
                Outcome::TripleFault => ("the guest triple-faulted (CPU reset)".to_string(), 0),
                Outcome::Stopped(why) => (format!("stopped by {why}"), 0),
                Outcome::Failed(why) => (format!("failed: {why}"), EXIT_RUNTIME),
            };
            eprintln!("vmm: {}: {what} after {secs:.2} s", g.machine);
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("vmm: {}: cannot run the VM: {}", g.machine, error_chain(&e));
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Seccomp for `vmm up`, before any thread starts: every one is started by the launcher.
fn start_sandbox(seccomp: vmm::sandbox::Mode) -> Result<(), ExitCode> {
    vmm::sandbox::init(seccomp, vmm::devices::DeviceKind::seccomp_lists()).map_err(|e| {
        eprintln!("vmm: {e}");
        ExitCode::from(EXIT_RUNTIME)
    })
}

/// `vmm up --landlock`: the files this machine may reach, from here on, in every thread.
fn restrict_files(file: &Path, checked: &vmm::Checked) -> Result<(), String> {
    use vmm::sandbox::landlock::{Enforced, FileUse, restrict};
    let (inputs, outputs) = checked.valid.host_files();
    let mut paths: Vec<(PathBuf, FileUse)> = inputs
        .into_iter()
        .map(|(p, w)| (p, if w { FileUse::ReadWrite } else { FileUse::Read }))
        .collect();
    for o in outputs {
        if let Some(dir) = o.parent() {
            paths.push((dir.to_path_buf(), FileUse::Entries));
        }
    }
    let abs = std::fs::canonicalize(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if let Some(dir) = abs.parent() {
        paths.push((dir.to_path_buf(), FileUse::Read));
    }
    paths.push((vmm::reconcile::control::runtime_dir(), FileUse::Entries));
    paths.push(("/dev/kvm".into(), FileUse::ReadWrite));
    paths.push((vmm::devices::net::TUN_PATH.into(), FileUse::ReadWrite));
    match restrict(&paths)? {
        Enforced::Fully => log::info!("landlock: {} paths", paths.len()),
        Enforced::Partly => eprintln!("vmm: landlock is only partly enforced by this kernel"),
        Enforced::Not => eprintln!("vmm: this kernel has no Landlock; --landlock does nothing"),
    }
    Ok(())
}

/// "outer: inner: innermost" for an error and its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn device(m: &clap::ArgMatches) -> ExitCode {
    let unsealed_ok = m.get_flag("allow_unsealed_memory");
    let seccomp = m
        .get_one::<Seccomp>("seccomp")
        .copied()
        .unwrap_or(Seccomp::On)
        .mode();
    vmm::sandbox::crash_on_panic();
    vmm::sandbox::owner_only_umask();
    let Some((key, km)) = m.subcommand() else {
        return ExitCode::from(EXIT_BAD_FILE);
    };
    let Some(kind) = vmm::devices::DeviceKind::from_key(key) else {
        return ExitCode::from(EXIT_BAD_FILE);
    };
    match vmm::vhost_user::cli::run(kind, km, unsealed_ok, seccomp) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            for line in f.message.lines() {
                eprintln!("vmm device {key}: {line}");
            }
            ExitCode::from(f.code)
        }
    }
}
