//! Property test: any machine spec vmm can represent survives serialize → parse (through the
//! schema check) → equal, in TOML and in JSON. This keeps the schema and the serde types in
//! agreement: whatever vmm writes, vmm (and editors using the schema) accept.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use vmm::contract::units::{ByteSize, DeviceName, FilePath, MacAddr, PciSlot};
use vmm::devices::block::BlockSpec;
use vmm::devices::console::ConsoleSpec;
use vmm::devices::legacy::cmos::RtcSpec;
use vmm::devices::legacy::i8042::I8042Spec;
use vmm::devices::legacy::serial::{ComPort, SerialSpec};
use vmm::devices::net::NetSpec;
use vmm::devices::rng::RngSpec;
use vmm::devices::vhost_user::{DeviceType, VhostUserSpec};
use vmm::hw::char_io::CharIo;
use vmm::spec::cpu::{CpuFeature, CpuSpec};
use vmm::spec::source::Format;
use vmm::spec::{MachineSpec, PciSpec, load_str};

fn name() -> impl Strategy<Value = DeviceName> {
    "[a-zA-Z][a-zA-Z0-9_-]{0,31}".prop_map(DeviceName)
}
fn path() -> impl Strategy<Value = FilePath> {
    "[a-zA-Z0-9 ._/-]{1,40}".prop_map(FilePath)
}
fn size() -> impl Strategy<Value = ByteSize> {
    prop_oneof![
        (0u64..1 << 62).prop_map(ByteSize),
        (0u64..1 << 20).prop_map(|n| ByteSize(n << 20))
    ]
}
fn slot() -> impl Strategy<Value = Option<PciSlot>> {
    proptest::option::of((0u8..32).prop_map(PciSlot))
}
fn io() -> impl Strategy<Value = CharIo> {
    prop_oneof![
        Just(CharIo::Stdio),
        Just(CharIo::None),
        path().prop_map(CharIo::File),
        path().prop_map(CharIo::Socket)
    ]
}
fn port() -> impl Strategy<Value = Option<ComPort>> {
    proptest::option::of(prop_oneof![
        Just(ComPort::Com1),
        Just(ComPort::Com2),
        Just(ComPort::Com3),
        Just(ComPort::Com4)
    ])
}

prop_compose! {
    fn machine()(
        name in name(), memory in size(), vcpus in 1u32..=254, kernel in path(),
        initrd in proptest::option::of(path()), cmdline in "[ -~]{0,80}", hotplug_slots in 0u8..=31,
        hide in proptest::collection::vec(prop_oneof![Just(CpuFeature::Avx512f), Just(CpuFeature::X2apic), Just(CpuFeature::Xsaves)], 0..3),
        serial in proptest::collection::vec((name(), port(), io()), 0..3),
        rtc in proptest::collection::vec(proptest::option::of(name()), 0..2),
        i8042 in proptest::collection::vec(proptest::option::of(name()), 0..2),
        block in proptest::collection::vec((name(), path(), any::<bool>(), proptest::option::of("[ -~]{1,20}"), slot()), 0..3),
        net in proptest::collection::vec((name(), "[A-Za-z0-9_.-]{1,15}", proptest::option::of(any::<[u8; 6]>()), slot()), 0..3),
        console in proptest::collection::vec((name(), io(), slot()), 0..3),
        rng in proptest::collection::vec((name(), proptest::option::of(size()), slot()), 0..3),
        vhost_user in proptest::collection::vec((name(), path(), 1u16..=63, proptest::option::of(1u16..=64), proptest::option::of(1u16..=32768), proptest::option::of(0u16..=256), slot()), 0..3),
    ) -> MachineSpec {
        MachineSpec {
            name, memory, vcpus, kernel, initrd, cmdline,
            cpu: CpuSpec { hide },
            pci: PciSpec { hotplug_slots },
            serial: serial.into_iter().map(|(name, port, io)| SerialSpec { name, port, io }).collect(),
            rtc: rtc.into_iter().map(|name| RtcSpec { name }).collect(),
            i8042: i8042.into_iter().map(|name| I8042Spec { name }).collect(),
            block: block.into_iter().map(|(name, path, readonly, serial, slot)| BlockSpec { name, path, readonly, serial, slot }).collect(),
            net: net.into_iter().map(|(name, tap, mac, slot)| NetSpec { name, tap, mac: mac.map(MacAddr), slot }).collect(),
            console: console.into_iter().map(|(name, io, slot)| ConsoleSpec { name, io, slot }).collect(),
            rng: rng.into_iter().map(|(name, rate, slot)| RngSpec { name, rate, slot }).collect(),
            vhost_user: vhost_user.into_iter().map(|(name, socket, device, queues, queue_size, config_size, slot)| VhostUserSpec { name, socket, device: DeviceType(device), queues, queue_size, config_size, slot }).collect(),
        }
    }
}

fn reload(text: String, format: Format) -> Result<MachineSpec, String> {
    let file = if format == Format::Json {
        "m.json"
    } else {
        "m.toml"
    };
    load_str(Path::new(file), text, format, PathBuf::from("/"))
        .map(|l| l.spec)
        .map_err(|r| r.render(false, 100))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn toml_round_trip(m in machine()) {
        let text = toml::to_string(&m).unwrap();
        prop_assert_eq!(reload(text.clone(), Format::Toml).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?, m);
    }

    #[test]
    fn json_round_trip(m in machine()) {
        let text = serde_json::to_string_pretty(&m).unwrap();
        prop_assert_eq!(reload(text.clone(), Format::Json).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?, m);
    }
}
