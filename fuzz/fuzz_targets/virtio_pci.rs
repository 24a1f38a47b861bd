//! The virtio-pci transport: register sequences on BAR 0 (common config, ISR, device config,
//! notify, MSI-X table and PBA) and on PCI config space, interleaved with guest memory writes,
//! against a device whose activation walks its real queues in that memory. Oracle: no panic,
//! no hang, and reads stay within what the registers can hold.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm::contract::VirtioInfo;
use vmm::hw::bus::BusDevice;
use vmm::hw::pci::PciFunction;
use vmm::hw::transport::virtio_pci::VirtioPci;
use vmm::hw::virtio::{ActivateError, Activation, VirtioDevice};
use vmm_fuzz::Input;

const BAR: u64 = 0x1_0000_0000;

/// Completes every chain the driver made available, at activation.
#[derive(Debug)]
struct Walker;

impl VirtioDevice for Walker {
    fn virtio(&self) -> &'static VirtioInfo {
        &VirtioInfo {
            device_type: 4,
            queue_sizes: std::borrow::Cow::Borrowed(&[16, 256]),
            pci_class: (0xff, 0),
        }
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 29) | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        vmm::hw::virtio::read_config_bytes(&[0xa5; 8], offset, data);
    }
    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        for q in &mut a.queues {
            let mut n = 0;
            while let Some(chain) = q.queue.pop_descriptor_chain(&a.mem) {
                let head = chain.head_index();
                let len: u32 = chain.map(|d| d.len()).fold(0u32, |s, l| s.wrapping_add(l));
                let _ = q.queue.add_used(&a.mem, head, len);
                q.irq.trigger();
                n += 1;
                if n > 512 {
                    break;
                }
            }
        }
        Ok(())
    }
    fn reset(&mut self) {}
}

fuzz_target!(|data: &[u8]| {
    let mem = vmm::testing::guest_mem(vmm_fuzz::MEM);
    let Ok(dev) = VirtioPci::new(
        "f",
        Box::new(Walker),
        Arc::new(vmm::testing::NullVm),
        mem.clone(),
        BAR,
    ) else {
        return;
    };
    let mut inp = Input(data);
    let mut steps = 0;
    while let Some(op) = inp.u8() {
        steps += 1;
        if steps > 4096 {
            break;
        }
        let len = [1usize, 2, 4, 8][usize::from(op >> 6)];
        match op & 7 {
            0 | 1 => {
                let Some(off) = inp.u16() else { break };
                let Some(v) = inp.u64() else { break };
                dev.lock()
                    .write(BAR, u64::from(off % 0x4000), &v.to_le_bytes()[..len]);
            }
            2 => {
                let Some(off) = inp.u16() else { break };
                let mut b = [0u8; 8];
                dev.lock().read(BAR, u64::from(off % 0x4000), &mut b[..len]);
            }
            3 => {
                let Some(off) = inp.u8() else { break };
                let Some(v) = inp.u32() else { break };
                let l = len.min(4);
                dev.lock()
                    .config_write(u16::from(off), &v.to_le_bytes()[..l]);
            }
            4 => {
                let Some(off) = inp.u8() else { break };
                let mut b = [0u8; 4];
                let l = len.min(4);
                dev.lock().config_read(u16::from(off), &mut b[..l]);
            }
            _ => {
                let Some(addr) = inp.u16() else { break };
                let n = usize::from(inp.u8().unwrap_or(0) % 32);
                let bytes = inp.bytes(n).to_vec();
                let _ = mem.write_slice(&bytes, GuestAddress(u64::from(addr)));
            }
        }
    }
});
