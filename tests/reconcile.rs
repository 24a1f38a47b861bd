//! The reconciler without KVM: a recording target stands in for the VM. Edits are checked,
//! planned and applied as in a running VM; what the VM is asked to do is what these assert.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm::reconcile::{RESIGNAL, Reconciler, Target, Verdict};

const BASE: &str = r#"name = "m"
memory = "64M"
vcpus = 1
kernel = "vmlinux"

[pci]
hotplug_slots = 2

[[serial]]
name = "com1"
io = "stdio"

[[block]]
name = "disk"
path = "disk.img"
slot = 1
"#;

fn nic(name: &str, tap: &str) -> String {
    format!("\n[[net]]\nname = \"{name}\"\ntap = \"{tap}\"\n")
}

/// Records what the VM is asked; plugging a TAP named "broken" fails, and so does every
/// plug while `refuse` is set; `errors` are the devices whose back end failed.
#[derive(Clone, Default)]
struct Fake(
    Arc<Mutex<Vec<String>>>,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<Mutex<Vec<(String, String)>>>,
);

impl Fake {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Target for Fake {
    fn plug(&mut self, node: &vmm::graph::DeviceNode) -> Result<(), String> {
        let slot = node.pci_slot().unwrap();
        if format!("{:?}", node.spec).contains("broken") {
            return Err("cannot open TAP broken".into());
        }
        if self.1.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("no back end listens".into());
        }
        self.0
            .lock()
            .unwrap()
            .push(format!("plug {} {slot}", node.name));
        Ok(())
    }
    fn request_unplug(&mut self, slot: u8) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("unplug {slot}"));
        Ok(())
    }
    fn remove(&mut self, slot: u8) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("remove {slot}"));
        Ok(())
    }
    fn stop(&mut self, why: &str) {
        self.0.lock().unwrap().push(format!("stop {why}"));
    }
    fn device_errors(&self) -> Vec<(String, String)> {
        self.2.lock().unwrap().clone()
    }
}

struct Setup {
    dir: tempfile::TempDir,
    path: PathBuf,
    fake: Fake,
    said: Arc<Mutex<Vec<String>>>,
    r: Reconciler<Fake>,
}

impl Setup {
    fn new(text: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.path().join("disk.img"), vec![0u8; 4096]).unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, text).unwrap();
        let checked = vmm::check_file(&path).unwrap_or_else(|r| panic!("{}", r.render(false, 100)));
        let fake = Fake::default();
        let said = Arc::new(Mutex::new(Vec::new()));
        let s2 = said.clone();
        let r = Reconciler::new(
            fake.clone(),
            &path,
            checked,
            Box::new(move |l| s2.lock().unwrap().push(l.to_string())),
        );
        Setup {
            dir,
            path,
            fake,
            said,
            r,
        }
    }

    fn edit(&mut self, text: &str) -> vmm::reconcile::EditOutcome {
        let p: &Path = &self.path.clone();
        self.r.edit(p, text.as_bytes().to_vec(), true)
    }

    fn slots(&self) -> Vec<(u64, String)> {
        serde_json::to_value(self.r.status()).unwrap()["hotplug_slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["slot"].as_u64().unwrap(),
                    s["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

#[test]
fn adding_and_removing_a_nic_plugs_and_unplugs_it() {
    let mut s = Setup::new(BASE);
    let with = format!("{BASE}{}", nic("eth1", "tap1"));
    let o = s.edit(&with);
    assert_eq!(o.verdict, Verdict::Live);
    assert!(o.applied);
    assert_eq!(s.fake.take(), ["plug eth1 30"]);
    assert_eq!(s.slots(), [(30, "used".into()), (31, "free".into())]);

    // Removing asks the guest; the device stays until the guest releases it.
    let o = s.edit(BASE);
    assert_eq!(o.verdict, Verdict::Live);
    assert_eq!(s.fake.take(), ["unplug 30"]);
    assert_eq!(s.slots()[0], (30, "releasing".into()));
    let st = serde_json::to_value(s.r.status()).unwrap();
    assert_eq!(st["pending_unplugs"].as_array().unwrap().len(), 1, "{st}");
    // An eject of another slot changes nothing.
    assert!(s.r.ejected(1 << 31).is_empty());
    assert!(s.fake.take().is_empty());
    let lines = s.r.ejected(1 << 30);
    assert_eq!(s.fake.take(), ["remove 30"]);
    assert!(lines[0].contains("removed"), "{lines:?}");
    assert_eq!(s.slots()[0], (30, "free".into()));

    // And back again, into the same slot.
    s.edit(&with);
    assert_eq!(s.fake.take(), ["plug eth1 30"]);
}

#[test]
fn reordered_or_reformatted_files_change_nothing() {
    let with = format!("{BASE}{}{}", nic("eth1", "tap1"), nic("eth2", "tap2"));
    let mut s = Setup::new(&with);
    let reordered = format!("{BASE}{}{}", nic("eth2", "tap2"), nic("eth1", "tap1"));
    assert_eq!(s.edit(&reordered).verdict, Verdict::NoChanges);
    let reformatted = with
        .replace(" = ", "=")
        .replace("\n[[", "\n\n# a comment\n[[");
    assert_eq!(s.edit(&reformatted).verdict, Verdict::NoChanges);
    assert!(s.fake.take().is_empty());
}

#[test]
fn invalid_edits_keep_the_last_good_file() {
    let mut s = Setup::new(BASE);
    for bad in [
        "not = [toml",
        &BASE.replace("vcpus = 1", "vcpus = \"one\""),
        &format!("{BASE}{}{}", nic("a", "t1"), nic("a", "t2")),
    ] {
        let o = s.edit(bad);
        assert_eq!(o.verdict, Verdict::Invalid, "{bad}");
        assert!(!o.applied);
        assert!(!o.diagnostics.is_empty());
        assert!(o.lines[0].contains("invalid, not applied"), "{:?}", o.lines);
    }
    assert!(s.fake.take().is_empty());
    // The next good edit is planned against the last good file.
    let o = s.edit(&format!("{BASE}{}", nic("eth1", "tap1")));
    assert_eq!(o.changes.len(), 1, "{:?}", o.changes);
    assert_eq!(s.fake.take(), ["plug eth1 30"]);
}

#[test]
fn more_nics_than_hotplug_slots_change_nothing() {
    let mut s = Setup::new(&format!("{BASE}{}", nic("eth1", "tap1")));
    // The third NIC would need a static slot: only a restart can give it one.
    let o = s.edit(&format!(
        "{BASE}{}{}{}",
        nic("eth1", "tap1"),
        nic("b", "t2"),
        nic("c", "t3")
    ));
    assert_eq!(o.verdict, Verdict::NeedsRestart);
    let text = o.lines.join("\n");
    assert!(text.contains("no free hotplug slot"), "{text}");
    assert!(text.contains("mixes live and restart-only"), "{text}");
    assert!(s.fake.take().is_empty());
    assert_eq!(s.slots(), [(30, "used".into()), (31, "free".into())]);
}

#[test]
fn restart_only_and_mixed_edits_apply_nothing() {
    let mut s = Setup::new(BASE);
    let o = s.edit(&BASE.replace("64M", "128M"));
    assert_eq!(o.verdict, Verdict::NeedsRestart);
    assert!(!o.applied);
    let text = o.lines.join("\n");
    assert!(text.contains("memory"), "{text}");
    assert!(text.contains("changed here"), "the span is shown: {text}");
    let mixed = format!("{}{}", BASE.replace("64M", "128M"), nic("eth1", "tap1"));
    let o = s.edit(&mixed);
    assert_eq!(o.verdict, Verdict::NeedsRestart);
    assert!(
        o.lines.join("\n").contains("mixes live and restart-only"),
        "{:?}",
        o.lines
    );
    // A changed block device (not hot-pluggable) and a changed NIC setting.
    let o = s.edit(&BASE.replace("disk.img\"", "disk.img\"\nreadonly = true"));
    assert_eq!(o.verdict, Verdict::NeedsRestart, "{:?}", o.lines);
    assert!(s.fake.take().is_empty(), "the VM was not touched");
    let with = format!("{BASE}{}", nic("eth1", "tap1"));
    s.edit(&with);
    s.fake.take();
    let o = s.edit(&with.replace("tap1", "tap9"));
    assert_eq!(o.verdict, Verdict::NeedsRestart);
    assert!(o.lines.join("\n").contains("rename"), "{:?}", o.lines);
    assert!(s.fake.take().is_empty());
}

#[test]
fn plan_requests_do_not_apply() {
    let mut s = Setup::new(BASE);
    let p = s.path.clone();
    let o = s.r.edit(
        &p,
        format!("{BASE}{}", nic("eth1", "tap1")).into_bytes(),
        false,
    );
    assert_eq!(o.verdict, Verdict::Live);
    assert!(!o.applied);
    assert!(o.lines.join("\n").contains("+ net `eth1`"), "{:?}", o.lines);
    assert!(s.fake.take().is_empty());
    assert_eq!(s.slots(), [(30, "free".into()), (31, "free".into())]);
}

#[test]
fn new_nics_avoid_slots_the_guest_is_still_releasing() {
    let with = format!("{BASE}{}", nic("eth1", "tap1"));
    let mut s = Setup::new(&with);
    assert_eq!(s.slots()[0], (30, "used".into()));
    s.edit(BASE);
    assert_eq!(s.fake.take(), ["unplug 30"]);
    // A new NIC while slot 30 is being released goes to 31.
    s.edit(&format!("{BASE}{}", nic("eth2", "tap2")));
    assert_eq!(s.fake.take(), ["plug eth2 31"]);
    // eth1 back while its old slot is still releasing: no free slot but 30, so it waits.
    let o = s.edit(&format!(
        "{BASE}{}{}",
        nic("eth2", "tap2"),
        nic("eth1b", "tap1")
    ));
    assert!(
        o.lines.join("\n").contains("waits for hotplug slot 30"),
        "{:?}",
        o.lines
    );
    assert!(s.fake.take().is_empty());
    // Once the guest releases slot 30, the waiting NIC is plugged there.
    let lines = s.r.ejected(1 << 30);
    assert_eq!(s.fake.take(), ["remove 30", "plug eth1b 30"]);
    assert!(
        lines.iter().any(|l| l.contains("+ net `eth1b`")),
        "{lines:?}"
    );
}

#[test]
fn unanswered_unplugs_are_signalled_again() {
    let with = format!("{BASE}{}", nic("eth1", "tap1"));
    let mut s = Setup::new(&with);
    s.edit(BASE);
    assert_eq!(s.fake.take(), ["unplug 30"]);
    s.r.tick(Instant::now());
    assert!(s.fake.take().is_empty(), "not yet");
    s.r.tick(Instant::now() + RESIGNAL);
    assert_eq!(s.fake.take(), ["unplug 30"]);
}

#[test]
fn failed_plugs_are_reported_and_retried() {
    let mut s = Setup::new(BASE);
    let o = s.edit(&format!("{BASE}{}", nic("eth1", "broken")));
    assert!(
        o.lines
            .join("\n")
            .contains("cannot plug: cannot open TAP broken"),
        "{:?}",
        o.lines
    );
    let st = serde_json::to_value(s.r.status()).unwrap();
    assert_eq!(
        st["devices"].as_array().unwrap().last().unwrap()["state"],
        "plug-failed",
        "{st}"
    );
    assert_eq!(s.slots()[0], (30, "free".into()));
    // Fixing the file (a new name: settings of a device are fixed) plugs it.
    s.edit(&format!("{BASE}{}", nic("eth1b", "tap1")));
    assert_eq!(s.fake.take(), ["plug eth1b 30"]);
    drop(s.dir);
    let said = s.said.lock().unwrap();
    assert!(
        said.is_empty(),
        "edit() reports to its caller, not the terminal: {said:?}"
    );
}

#[test]
fn a_deleted_or_unreadable_file_is_reported_and_changes_nothing() {
    use vmm::reconcile::Event;
    use vmm::reconcile::watch::WatchEvent;
    let mut s = Setup::new(&format!("{BASE}{}", nic("eth1", "tap1")));
    assert!(s.r.handle(Event::File(WatchEvent::Deleted)));
    assert!(s.r.handle(Event::File(WatchEvent::Unreadable(
        "Permission denied (os error 13)".into()
    ))));
    let said = s.said.lock().unwrap().clone();
    assert!(
        said[0].contains("deleted; the VM keeps running as it is"),
        "{said:?}"
    );
    assert!(
        said[1].contains("cannot be read (Permission denied (os error 13)); the VM is unchanged"),
        "{said:?}"
    );
    assert!(s.fake.take().is_empty());
    assert_eq!(s.slots()[0], (30, "used".into()));
    // A save afterwards is planned against the last good file, as usual.
    assert!(s.r.handle(Event::File(WatchEvent::Changed(BASE.as_bytes().to_vec()))));
    assert_eq!(s.fake.take(), ["unplug 30"]);
}

/// Machine `name` with absolute paths into `assets`, so that the file may live anywhere.
fn machine_in(assets: &Path, name: &str, extra: &str) -> String {
    let base = BASE
        .replace("name = \"m\"", &format!("name = \"{name}\""))
        .replace("\"vmlinux\"", &format!("{:?}", assets.join("vmlinux")))
        .replace("\"disk.img\"", &format!("{:?}", assets.join("disk.img")));
    format!("{base}{extra}")
}

fn vmm_cli(runtime: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .env("VMM_RUNTIME_DIR", runtime)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `root/assets` with the kernel and disk image, and an empty runtime dir `root/run`.
fn assets_and_runtime(root: &Path) -> (PathBuf, PathBuf) {
    let assets = root.join("assets");
    let runtime = root.join("run");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::create_dir_all(&runtime).unwrap();
    // vmm refuses a runtime directory others can reach.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(assets.join("vmlinux"), b"kernel").unwrap();
    std::fs::write(assets.join("disk.img"), vec![0u8; 4096]).unwrap();
    (assets, runtime)
}

/// A running reconciler (real watcher and control socket, recording target) whose file is
/// `file`, checked from `checked_from`.
fn live(
    file: &Path,
    checked_from: &Path,
    socket: PathBuf,
) -> (vmm::reconcile::Live, Fake, Arc<Mutex<Vec<String>>>) {
    let checked =
        vmm::check_file(checked_from).unwrap_or_else(|r| panic!("{}", r.render(false, 100)));
    let fake = Fake::default();
    let said = Arc::new(Mutex::new(Vec::new()));
    let s2 = said.clone();
    let (l, _) = vmm::reconcile::Live::start(
        fake.clone(),
        file,
        checked,
        Some(socket),
        Box::new(move |l| s2.lock().unwrap().push(l.to_string())),
        true,
    );
    (l, fake, said)
}

/// A machine file whose directory cannot be watched still takes `vmm apply`; `vmm status`
/// finds the one VM that answers, ignores sockets left by VMs that are gone, and asks for a
/// name when several run.
#[test]
fn cli_finds_running_vms_and_applies_without_a_watch() {
    let root = tempfile::tempdir().unwrap();
    let (assets, runtime) = assets_and_runtime(root.path());
    let m_file = root.path().join("m.toml");
    std::fs::write(&m_file, machine_in(&assets, "m", "")).unwrap();

    // The VM's file is in a directory that does not exist: no watch.
    let unwatchable = root.path().join("gone").join("m.toml");
    let (vm_m, fake_m, said_m) = live(&unwatchable, &m_file, runtime.join("m.sock"));
    let said = said_m.lock().unwrap().clone();
    assert!(
        said.iter().any(|l| l.contains("cannot watch it")
            && l.contains("edits are not applied (vmm apply still works)")),
        "{said:?}"
    );
    // A socket file whose VM is gone (nothing listens).
    drop(std::os::unix::net::UnixListener::bind(runtime.join("gone.sock")).unwrap());

    let (rc, out, err) = vmm_cli(&runtime, &["status"]);
    assert_eq!(rc, Some(0), "{err}");
    assert!(out.starts_with("machine m "), "{out}");

    std::fs::write(&m_file, machine_in(&assets, "m", &nic("eth1", "tap1"))).unwrap();
    let (rc, out, err) = vmm_cli(&runtime, &["apply", m_file.to_str().unwrap()]);
    assert_eq!(rc, Some(0), "{out}{err}");
    assert_eq!(fake_m.take(), ["plug eth1 30"]);

    // A second VM (this one watched).
    let n_file = root.path().join("n.toml");
    std::fs::write(&n_file, machine_in(&assets, "n", "")).unwrap();
    let (vm_n, _fake_n, said_n) = live(&n_file, &n_file, runtime.join("n.sock"));
    let (rc, _, err) = vmm_cli(&runtime, &["status"]);
    assert_eq!(rc, Some(1));
    assert!(err.contains("several VMs run (m, n): name one"), "{err}");
    let (rc, out, err) = vmm_cli(&runtime, &["status", "n"]);
    assert_eq!(rc, Some(0), "{err}");
    assert!(out.starts_with("machine n "), "{out}");
    assert!(
        !said_n
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("cannot watch")),
        "{:?}",
        said_n.lock().unwrap()
    );

    drop(vm_m);
    drop(vm_n);
    let (rc, _, err) = vmm_cli(&runtime, &["status"]);
    assert_eq!(rc, Some(1));
    assert!(
        err.contains("no running VM has a control socket in")
            && err.contains("(left by VMs that are gone: gone)"),
        "{err}"
    );
}

/// A client that connects and sends nothing does not hold up others: `vmm status` is answered
/// while it is connected, and so is its own request when it finally sends one.
#[test]
fn a_silent_client_does_not_hold_up_others() {
    use std::io::{BufRead, Write};
    let root = tempfile::tempdir().unwrap();
    let (assets, runtime) = assets_and_runtime(root.path());
    let file = root.path().join("m.toml");
    std::fs::write(&file, machine_in(&assets, "m", "")).unwrap();
    let (_vm, _fake, _said) = live(&file, &file, runtime.join("m.sock"));
    let silent = std::os::unix::net::UnixStream::connect(runtime.join("m.sock")).unwrap();

    let (rc, out, err) = vmm_cli(&runtime, &["status"]);
    assert_eq!(rc, Some(0), "{err}");
    assert!(out.starts_with("machine m "), "{out}");

    (&silent).write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(&silent)
        .read_line(&mut answer)
        .unwrap();
    assert!(answer.contains("\"machine\":\"m\""), "{answer:?}");
}

/// 16 clients that send nothing take every slot; a 17th takes the place of the one that has
/// been silent longest (cut off: it reads end of file), and is answered.
#[test]
fn silent_clients_cannot_turn_others_away() {
    let root = tempfile::tempdir().unwrap();
    let (assets, runtime) = assets_and_runtime(root.path());
    let file = root.path().join("m.toml");
    std::fs::write(&file, machine_in(&assets, "m", "")).unwrap();
    let (_vm, _fake, _said) = live(&file, &file, runtime.join("m.sock"));
    let silent: Vec<_> = (0..16)
        .map(|_| std::os::unix::net::UnixStream::connect(runtime.join("m.sock")).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (rc, out, err) = vmm_cli(&runtime, &["status"]);
    assert_eq!(rc, Some(0), "{err}");
    assert!(out.starts_with("machine m "), "{out}");
    // The first silent client was the one cut off.
    use std::io::Read;
    silent[0]
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 16];
    assert_eq!(
        (&silent[0]).read(&mut b).unwrap(),
        0,
        "the oldest silent client was kept"
    );
}

/// Something that accepts on the socket and closes without answering is reported as such.
#[test]
fn a_socket_that_closes_without_answering_is_reported() {
    let root = tempfile::tempdir().unwrap();
    let (_, runtime) = assets_and_runtime(root.path());
    let sock = runtime.join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let closer = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        drop(conn);
    });
    let (rc, _, err) = vmm_cli(&runtime, &["status", "--socket", sock.to_str().unwrap()]);
    closer.join().unwrap();
    assert_eq!(rc, Some(1));
    assert!(
        err.contains("vmm: the VM closed the connection without answering"),
        "{err}"
    );
}

/// Files the running machine named and that the edit leaves as they were are not looked at
/// again: a kernel being rebuilt (gone for a moment), a FIFO or a device at its path must not
/// stop a NIC edit. A path that changes is checked, and never blocks.
#[test]
fn unchanged_files_do_not_stop_a_nic_edit_and_changed_ones_are_checked() {
    let mut s = Setup::new(BASE);
    std::fs::remove_file(s.dir.path().join("vmlinux")).unwrap();
    std::fs::remove_file(s.dir.path().join("disk.img")).unwrap();
    let with = format!("{BASE}{}", nic("eth1", "tap1"));
    let o = s.edit(&with);
    assert_eq!(o.verdict, Verdict::Live, "{}", o.lines.join("\n"));
    assert_eq!(s.fake.take(), ["plug eth1 30"]);
    // The kernel's path now names a FIFO: the edit is a restart-only change, checked at once
    // (a blocking open would wait for a writer forever) and refused with the reason.
    let fifo = s.dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let o = s.edit(&with.replace("kernel = \"vmlinux\"", "kernel = \"fifo\""));
    assert_eq!(o.verdict, Verdict::Invalid);
    assert!(
        o.lines.join("\n").contains("is a FIFO, not a regular file"),
        "{}",
        o.lines.join("\n")
    );
    assert!(s.fake.take().is_empty());
    // A new disk image path is checked too (and the missing file reported).
    let o = s.edit(&with.replace("path = \"disk.img\"", "path = \"other.img\""));
    assert_eq!(o.verdict, Verdict::Invalid);
    assert!(o.lines.join("\n").contains("other.img does not exist"));
}

/// An edit over the size limit (from the watcher or `vmm apply`) is refused with the same
/// diagnostic `vmm check` gives, and changes nothing.
#[test]
fn an_oversized_edit_is_refused_like_vmm_check_refuses_it() {
    let mut s = Setup::new(BASE);
    let mut big = format!("{BASE}{}", nic("eth1", "tap1"));
    while big.len() <= vmm::spec::MAX_FILE_SIZE {
        big.push_str("# padding padding padding padding padding padding padding\n");
    }
    let o = s.edit(&big);
    assert_eq!(o.verdict, Verdict::Invalid);
    let text = o.lines.join("\n");
    assert!(text.contains("larger than 256 KiB"), "{text}");
    assert_eq!(o.diagnostics[0]["code"], "vmm::too-large");
    assert!(s.fake.take().is_empty());
}

/// A save that changes nothing (or `vmm apply` of the same file) retries what did not
/// converge: a plug that was refused, and a hot-plugged device whose back end failed (it is
/// unplugged, then plugged again once the guest released it). With nothing to retry it is
/// silent and does nothing.
#[test]
fn an_unchanged_save_retries_refused_plugs_and_failed_back_ends() {
    use std::sync::atomic::Ordering;
    use vmm::reconcile::Event;
    use vmm::reconcile::watch::WatchEvent;
    let mut s = Setup::new(BASE);
    let with = format!("{BASE}{}", nic("eth1", "tap1"));
    s.fake.1.store(true, Ordering::Relaxed);
    let o = s.edit(&with);
    assert!(o.lines.join("\n").contains("cannot plug"), "{:?}", o.lines);
    assert!(s.fake.take().is_empty());
    let st = serde_json::to_value(s.r.status()).unwrap();
    assert!(st.to_string().contains("plug-failed"), "{st}");
    // Still refused: retried, still failed.
    assert!(s.r.handle(Event::File(WatchEvent::Unchanged)));
    assert!(s.fake.take().is_empty());
    assert!(
        s.said.lock().unwrap().join("\n").contains("retrying"),
        "{:?}",
        s.said
    );
    // The back end is there now.
    s.fake.1.store(false, Ordering::Relaxed);
    assert!(s.r.handle(Event::File(WatchEvent::Unchanged)));
    assert_eq!(s.fake.take(), ["plug eth1 30"]);
    // Nothing to retry: nothing happens, nothing is said.
    s.said.lock().unwrap().clear();
    assert!(s.r.handle(Event::File(WatchEvent::Unchanged)));
    assert!(s.fake.take().is_empty());
    assert!(s.said.lock().unwrap().is_empty(), "{:?}", s.said);

    // Its back end fails: `vmm apply` of the same file unplugs it...
    s.fake
        .2
        .lock()
        .unwrap()
        .push(("eth1".into(), "the back end hung up".into()));
    let o = s.edit(&with);
    assert_eq!(o.verdict, Verdict::Live);
    assert!(o.applied);
    assert!(
        o.lines
            .join("\n")
            .contains("to plug it again (its back end failed)"),
        "{:?}",
        o.lines
    );
    assert_eq!(s.fake.take(), ["unplug 30"]);
    // ... and plugs it again (a new device, healthy) once the guest released it.
    s.fake.2.lock().unwrap().clear();
    s.r.ejected(1 << 30);
    assert_eq!(s.fake.take(), ["remove 30", "plug eth1 30"]);
    // A failed device in a static slot stays: it cannot be re-plugged.
    s.fake
        .2
        .lock()
        .unwrap()
        .push(("disk".into(), "gone".into()));
    assert_eq!(s.edit(&with).verdict, Verdict::NoChanges);
    assert!(s.fake.take().is_empty());
}
