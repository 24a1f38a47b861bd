//! CMOS real-time clock and NVRAM (MC146818) at I/O ports 0x70–0x71, IRQ 8.
//!
//! Linux's rtc-cmos driver reads the date from it (`hwclock`); the time base is the host's UTC
//! clock.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::units::DeviceName;
use crate::contract::{
    AcpiNode, DeviceError, DeviceKindInfo, DeviceSpec, KindInfo, Needs, PioPlacement, PlatformFact,
};
use crate::devices::Device;

/// The CMOS RTC. Write `[[rtc]]` to give the machine one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RtcSpec {
    /// Device name; "rtc" when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<DeviceName>,
}

static PLACEMENT: [PioPlacement; 1] = [PioPlacement {
    label: "cmos",
    ports: &[(0x70, 2)],
    irqs: &[8],
    acpi: &[AcpiNode {
        name: "RTC_",
        hid: "PNP0B00",
        uid: None,
        ports: true,
        irqs: &[0],
    }],
}];

impl DeviceKindInfo for RtcSpec {
    const INFO: KindInfo = KindInfo {
        key: "rtc",
        noun: "real-time clock",
        hotpluggable: false,
        max_count: Some(1),
        aliases: &["cmos", "clock"],
        platform: &[PlatformFact::CmosRtc],
        vhost_user: None,
        seccomp: &crate::sandbox::NO_WORKER,
    };
}

impl DeviceSpec for RtcSpec {
    fn info(&self) -> &'static KindInfo {
        &Self::INFO
    }
    fn name(&self) -> &str {
        self.name.as_ref().map_or("rtc", |n| n.as_str())
    }
    fn needs(&self) -> Needs {
        Needs::Pio(&PLACEMENT)
    }
}

impl Device for RtcSpec {
    fn build(
        &self,
        at: &crate::contract::Placement,
        m: &mut dyn crate::hw::Machine,
    ) -> Result<(), DeviceError> {
        let (below, above) = m.ram();
        let base = match at {
            crate::contract::Placement::Pio { ports, .. } => ports[0],
            _ => PLACEMENT[0].ports[0],
        };
        let dev = std::sync::Arc::new(crate::sync::Mutex::new(
            crate::sync::Rank::BusDevice,
            Cmos::with_host_clock(below, above),
        ));
        m.add_pio(base.0, base.1, dev)
    }
}

// ---------------------------------------------------------------------------------------------
// Device model
// ---------------------------------------------------------------------------------------------

use std::time::{SystemTime, UNIX_EPOCH};

use crate::hw::bus::BusDevice;

/// Size of the NVRAM, registers included.
const NVRAM_SIZE: usize = 128;
/// Port 0x70 bit 7 gates NMIs on a real PC; the rest selects the register.
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register A: update in progress.
const A_UIP: u8 = 0x80;
/// Register A default: 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = 0x26;
/// Register B: updates inhibited while the guest sets the time.
const B_SET: u8 = 0x80;
/// Register B: time registers in binary (set) or BCD (clear).
const B_BINARY: u8 = 0x04;
/// Register B: 24-hour (set) or 12-hour (clear) clock.
const B_24H: u8 = 0x02;
/// Register B default: 24-hour clock, BCD.
const B_DEFAULT: u8 = B_24H;
/// Register D: valid RAM and time.
const D_VRT: u8 = 0x80;
/// Hours register in 12-hour mode: PM.
const HOURS_PM: u8 = 0x80;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SECS_PER_DAY: i64 = 86_400;

/// The host clock the RTC counts from.
pub type Clock = Box<dyn Fn() -> SystemTime + Send>;

/// A broken-down UTC time (proleptic Gregorian calendar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    /// 1..=12
    month: u8,
    /// 1..=31 (may exceed the month's length while the guest is setting the date).
    day: u8,
    /// 0..=23
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    /// Breaks down seconds since the Unix epoch (days-to-civil, Howard Hinnant's algorithm).
    fn from_unix(t: i64) -> DateTime {
        let days = t.div_euclid(SECS_PER_DAY);
        let secs = t.rem_euclid(SECS_PER_DAY);
        let z = days + 719_468; // days since 0000-03-01
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097); // day of era, 0..=146096
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st
        let mp = (5 * doy + 2) / 153; // month from March, 0..=11
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year,
            month: month as u8,
            day: day as u8,
            hour: (secs / 3600) as u8,
            minute: (secs / 60 % 60) as u8,
            second: (secs % 60) as u8,
        }
    }

    /// Days since the Unix epoch of the date (civil-to-days); a day past the end of its month
    /// rolls over into the next one.
    fn days(self) -> i64 {
        let month = i64::from(self.month.clamp(1, 12));
        let year = self.year - i64::from(month <= 2);
        let era = year.div_euclid(400);
        let yoe = year.rem_euclid(400);
        let mp = (month + 9) % 12; // month from March
        let doy = (153 * mp + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// Seconds since the Unix epoch.
    fn to_unix(self) -> i64 {
        let secs = i64::from(self.hour) * 3600 + i64::from(self.minute) * 60;
        self.days()
            .saturating_mul(SECS_PER_DAY)
            .saturating_add(secs + i64::from(self.second))
    }

    /// Day of the week, 1 = Sunday.
    fn weekday(self) -> u8 {
        // 1970-01-01 was a Thursday (4 counting from Sunday = 0).
        ((self.days() + 4).rem_euclid(7) + 1) as u8
    }
}

/// Seconds since the Unix epoch, negative before it, saturating far from it.
fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// The MC146818 CMOS real-time clock and its 128 bytes of NVRAM, at ports 0x70 (index) and
/// 0x71 (data); register it as one range of 2 ports (offset 0 = index, offset 1 = data).
///
/// The clock is the host's UTC clock (or the injected [`Clock`]) plus an offset the guest sets
/// by writing the time registers, so the guest's time keeps advancing with the host's. The
/// time registers follow register B's data mode (BCD or binary) and 12/24-hour mode; the day of
/// the week is derived from the date. Setting the time while register B's SET bit is on is
/// staged: the time registers then read and write a frozen copy that takes effect when SET is
/// cleared. Without SET, each write takes effect at once (a day past the end of the month rolls
/// over into the next month). Out-of-range and malformed BCD writes to time registers are
/// dropped. The memory size bytes (0x15–0x18, 0x30–0x31, 0x34–0x35, 0x5b–0x5d) are filled in
/// as a PC BIOS does; all other bytes are plain storage.
///
/// Not emulated: interrupts (alarm, periodic, update-ended; register C always reads 0 and IRQ 8
/// is never raised), the update cycle (UIP always reads 0), daylight saving, the divider
/// controls in register A (stored only), the NMI mask in bit 7 of the index (ignored) and the
/// BIOS checksum at 0x2e–0x2f. Port 0x70 reads as 0xff. Accesses wider than a byte are split
/// into byte accesses to consecutive ports; bytes past port 0x71 read 0xff and are dropped.
pub struct Cmos {
    /// The selected register.
    index: u8,
    nvram: [u8; NVRAM_SIZE],
    clock: Clock,
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// The time being set while register B's SET bit is on.
    staged: Option<DateTime>,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos")
            .field("index", &self.index)
            .field("offset", &self.offset)
            .field("staged", &self.staged)
            .finish_non_exhaustive()
    }
}

impl Cmos {
    /// An RTC counting from `clock` (UTC), with the memory size bytes describing
    /// `mem_below_4g` bytes of RAM below 4 GiB and `mem_above_4g` bytes above it.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64, clock: Clock) -> Cmos {
        let mut nvram = [0u8; NVRAM_SIZE];
        nvram[usize::from(REG_A)] = A_DEFAULT;
        nvram[usize::from(REG_B)] = B_DEFAULT;
        nvram[usize::from(REG_D)] = D_VRT;

        let base_kib: u16 = 640;
        let ext_kib = (mem_below_4g.saturating_sub(MIB) / KIB).min(0xffff) as u16;
        let above_16m = (mem_below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff) as u16;
        let above_4g = (mem_above_4g / (64 * KIB)).min(0xff_ffff) as u32;
        let mut put = |at: usize, bytes: &[u8]| nvram[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x15, &base_kib.to_le_bytes());
        put(0x17, &ext_kib.to_le_bytes());
        put(0x30, &ext_kib.to_le_bytes());
        put(0x34, &above_16m.to_le_bytes());
        put(0x5b, &above_4g.to_le_bytes()[..3]);

        Cmos {
            index: 0,
            nvram,
            clock,
            offset: 0,
            staged: None,
        }
    }

    /// An RTC counting from the host's clock ([`SystemTime::now`]).
    pub fn with_host_clock(mem_below_4g: u64, mem_above_4g: u64) -> Cmos {
        Cmos::new(mem_below_4g, mem_above_4g, Box::new(SystemTime::now))
    }

    fn host_secs(&self) -> i64 {
        unix_secs((self.clock)())
    }

    /// The guest's current time: the staged one while SET is on.
    fn now(&self) -> DateTime {
        self.staged
            .unwrap_or_else(|| DateTime::from_unix(self.host_secs().saturating_add(self.offset)))
    }

    fn set_time(&mut self, t: DateTime) {
        self.offset = t.to_unix().saturating_sub(self.host_secs());
    }

    fn reg_b(&self) -> u8 {
        self.nvram[usize::from(REG_B)]
    }

    /// Encodes a value 0..=99 in the current data mode.
    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    /// Decodes a register value in the current data mode; None for malformed BCD.
    fn decode(&self, v: u8) -> Option<u8> {
        if self.reg_b() & B_BINARY != 0 {
            Some(v)
        } else if v >> 4 <= 9 && v & 0xf <= 9 {
            Some((v >> 4) * 10 + (v & 0xf))
        } else {
            None
        }
    }

    fn encode_hours(&self, hour: u8) -> u8 {
        if self.reg_b() & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hours(&self, v: u8) -> Option<u8> {
        if self.reg_b() & B_24H != 0 {
            return self.decode(v).filter(|&h| h <= 23);
        }
        let h12 = self
            .decode(v & !HOURS_PM)
            .filter(|h| (1..=12).contains(h))?;
        let pm = if v & HOURS_PM != 0 { 12 } else { 0 };
        Some(h12 % 12 + pm)
    }

    fn read_time(&self, reg: u8) -> u8 {
        let t = self.now();
        let field = |v: i64| v.rem_euclid(100) as u8;
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hours(t.hour),
            REG_WEEKDAY => self.encode(t.weekday()),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(field(t.year)),
            _ => self.encode(field(t.year.div_euclid(100))),
        }
    }

    /// A guest write to a time register: sets that field of the guest's time.
    fn write_time(&mut self, reg: u8, v: u8) {
        let value = if reg == REG_HOURS {
            self.decode_hours(v)
        } else {
            self.decode(v)
        };
        let Some(value) = value else { return };
        let mut t = self.now();
        match reg {
            REG_SECONDS | REG_MINUTES if value > 59 => return,
            REG_SECONDS => t.second = value,
            REG_MINUTES => t.minute = value,
            REG_HOURS => t.hour = value,
            REG_DAY if (1..=31).contains(&value) => t.day = value,
            REG_MONTH if (1..=12).contains(&value) => t.month = value,
            REG_YEAR if value <= 99 => {
                t.year = t.year.div_euclid(100) * 100 + i64::from(value);
            }
            REG_CENTURY if value <= 99 => {
                t.year = i64::from(value) * 100 + t.year.rem_euclid(100);
            }
            // The day of the week (it follows from the date) and out-of-range values: dropped.
            _ => return,
        }
        if self.staged.is_some() {
            self.staged = Some(t);
        } else {
            self.set_time(t);
        }
    }

    fn write_reg_b(&mut self, v: u8) {
        let was_set = self.reg_b() & B_SET != 0;
        let set = v & B_SET != 0;
        if set && !was_set {
            self.staged = Some(self.now());
        }
        self.nvram[usize::from(REG_B)] = v;
        if !set && let Some(t) = self.staged.take() {
            self.set_time(t);
        }
    }

    fn read_reg(&mut self, reg: u8) -> u8 {
        let reg = reg & INDEX_MASK;
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => self.read_time(reg),
            REG_A => self.nvram[usize::from(REG_A)] & !A_UIP,
            REG_C => std::mem::take(&mut self.nvram[usize::from(REG_C)]),
            REG_D => D_VRT,
            _ => self.nvram[usize::from(reg)],
        }
    }

    fn write_reg(&mut self, reg: u8, v: u8) {
        let reg = reg & INDEX_MASK;
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => self.write_time(reg, v),
            REG_A => self.nvram[usize::from(REG_A)] = v & !A_UIP,
            REG_B => self.write_reg_b(v),
            REG_C | REG_D => {}
            _ => self.nvram[usize::from(reg)] = v,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, byte) in (0u64..).zip(data.iter_mut()) {
            *byte = match offset.checked_add(i) {
                Some(1) => self.read_reg(self.index),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for (i, &byte) in (0u64..).zip(data.iter()) {
            match offset.checked_add(i) {
                Some(0) => self.index = byte & INDEX_MASK,
                Some(1) => self.write_reg(self.index, byte),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::time::Duration;

    use super::*;

    /// 2026-11-25 09:56:29 UTC, a Wednesday.
    const T0: i64 = 1_795_600_589;
    const GIB: u64 = 1 << 30;

    /// A CMOS whose host clock is the returned cell (Unix seconds).
    fn cmos_at(secs: i64) -> (Cmos, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(secs));
        let n = now.clone();
        let clock: Clock = Box::new(move || {
            let s = n.load(Ordering::SeqCst);
            match u64::try_from(s) {
                Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
                Err(_) => UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()),
            }
        });
        (Cmos::new(64 * MIB, 0, clock), now)
    }

    fn rd(c: &mut Cmos, index: u8) -> u8 {
        c.write(0x70, 0, &[index]);
        let mut b = [0u8];
        c.read(0x70, 1, &mut b);
        b[0]
    }

    fn wr(c: &mut Cmos, index: u8, v: u8) {
        c.write(0x70, 0, &[index]);
        c.write(0x70, 1, &[v]);
    }

    /// sec, min, hours, weekday, day, month, year, century.
    fn time(c: &mut Cmos) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|r| rd(c, r))
    }

    #[test]
    fn time_fields_bcd() {
        let (mut c, _) = cmos_at(T0);
        assert_eq!(rd(&mut c, REG_B), 0x02);
        assert_eq!(
            time(&mut c),
            [0x29, 0x56, 0x09, 0x04, 0x25, 0x11, 0x26, 0x20]
        );
    }

    #[test]
    fn time_fields_binary() {
        let (mut c, _) = cmos_at(T0);
        wr(&mut c, REG_B, B_BINARY | B_24H);
        assert_eq!(time(&mut c), [29, 56, 9, 4, 25, 11, 26, 20]);
    }

    #[test]
    fn hours_12h_mode() {
        let (mut c, now) = cmos_at(T0);
        wr(&mut c, REG_B, 0); // BCD, 12-hour
        assert_eq!(rd(&mut c, REG_HOURS), 0x09);
        now.store(T0 + 12 * 3600, Ordering::SeqCst); // 21:56
        assert_eq!(rd(&mut c, REG_HOURS), 0x89);
        now.store(T0 - 9 * 3600, Ordering::SeqCst); // 00:56
        assert_eq!(rd(&mut c, REG_HOURS), 0x12);
        now.store(T0 + 3 * 3600, Ordering::SeqCst); // 12:56
        assert_eq!(rd(&mut c, REG_HOURS), 0x92);
        wr(&mut c, REG_B, B_BINARY); // binary, 12-hour
        now.store(T0 + 13 * 3600, Ordering::SeqCst); // 22:56
        assert_eq!(rd(&mut c, REG_HOURS), 0x80 | 10);
        // Writing 11 PM in 12-hour binary mode sets 23:xx.
        wr(&mut c, REG_HOURS, 0x80 | 11);
        wr(&mut c, REG_B, B_BINARY | B_24H);
        assert_eq!(rd(&mut c, REG_HOURS), 23);
    }

    #[test]
    fn calendar_round_trip() {
        let t = DateTime::from_unix(T0);
        assert_eq!((t.year, t.month, t.day, t.weekday()), (2026, 11, 25, 4));
        let t = DateTime::from_unix(951_825_600);
        assert_eq!((t.year, t.month, t.day, t.hour), (2000, 2, 29, 12));
        let t = DateTime::from_unix(-1);
        assert_eq!(
            (t.year, t.month, t.day, t.second, t.weekday()),
            (1969, 12, 31, 59, 4)
        );
        for s in (-200 * 366 * SECS_PER_DAY..400 * 366 * SECS_PER_DAY).step_by(86_399 * 7) {
            assert_eq!(DateTime::from_unix(s).to_unix(), s);
        }
        for s in [i64::MIN, i64::MAX] {
            let _ = DateTime::from_unix(s).to_unix();
        }
    }

    #[test]
    fn written_time_advances_with_host_clock() {
        let (mut c, now) = cmos_at(T0);
        // As Linux's hwclock does: SET, fields, clear SET.
        wr(&mut c, REG_B, B_SET | B_24H);
        for (reg, v) in [
            (0x00, 0x59),
            (0x02, 0x59),
            (0x04, 0x23),
            (0x07, 0x31),
            (0x08, 0x12),
        ] {
            wr(&mut c, reg, v);
        }
        wr(&mut c, REG_YEAR, 0x99);
        wr(&mut c, REG_CENTURY, 0x19);
        // Staged: frozen while SET is on, even though the host clock moves.
        now.store(T0 + 100, Ordering::SeqCst);
        assert_eq!(
            time(&mut c),
            [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]
        );
        wr(&mut c, REG_B, B_24H);
        assert_eq!(
            time(&mut c),
            [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]
        );
        now.store(T0 + 105, Ordering::SeqCst);
        assert_eq!(
            time(&mut c),
            [0x04, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );

        // Without SET a write applies at once.
        wr(&mut c, REG_MINUTES, 0x30);
        now.store(T0 + 110, Ordering::SeqCst);
        assert_eq!(&time(&mut c)[..3], &[0x09, 0x30, 0x00]);
    }

    #[test]
    fn bad_time_writes_are_dropped() {
        let (mut c, _) = cmos_at(T0);
        let before = time(&mut c);
        for (reg, v) in [
            (REG_SECONDS, 0x60),
            (REG_SECONDS, 0x1a),
            (REG_MINUTES, 0xff),
            (REG_HOURS, 0x24),
            (REG_DAY, 0x00),
            (REG_DAY, 0x32),
            (REG_MONTH, 0x13),
            (REG_MONTH, 0x00),
            (REG_YEAR, 0xa0),
            (REG_CENTURY, 0xff),
            (REG_WEEKDAY, 0x01),
        ] {
            wr(&mut c, reg, v);
        }
        wr(&mut c, REG_B, 0); // 12-hour: 0 and 13 are not hours
        wr(&mut c, REG_HOURS, 0x00);
        wr(&mut c, REG_HOURS, 0x93);
        wr(&mut c, REG_B, B_BINARY | B_24H);
        wr(&mut c, REG_SECONDS, 60);
        wr(&mut c, REG_YEAR, 100);
        wr(&mut c, REG_B, B_24H);
        assert_eq!(time(&mut c), before);
    }

    #[test]
    fn status_registers() {
        let (mut c, _) = cmos_at(T0);
        // D: VRT always set, read-only.
        assert_eq!(rd(&mut c, REG_D), 0x80);
        wr(&mut c, REG_D, 0);
        assert_eq!(rd(&mut c, REG_D), 0x80);
        // C: read-only, reads clear it.
        c.nvram[usize::from(REG_C)] = 0xf0;
        wr(&mut c, REG_C, 0x12);
        assert_eq!(rd(&mut c, REG_C), 0xf0);
        assert_eq!(rd(&mut c, REG_C), 0);
        // A: UIP never set, the rest is storage.
        assert_eq!(rd(&mut c, REG_A), 0x26);
        wr(&mut c, REG_A, 0xff);
        assert_eq!(rd(&mut c, REG_A), 0x7f);
        for _ in 0..1000 {
            assert_eq!(rd(&mut c, REG_A) & A_UIP, 0);
        }
    }

    #[test]
    fn nmi_bit_is_masked_and_nvram_is_storage() {
        let (mut c, _) = cmos_at(T0);
        assert_eq!(rd(&mut c, 0x80 | REG_D), 0x80);
        wr(&mut c, 0x80 | 0x40, 0xa5);
        assert_eq!(rd(&mut c, 0x40), 0xa5);
        for i in 0x0e..0x80u8 {
            if i == REG_CENTURY {
                continue;
            }
            wr(&mut c, i, i ^ 0x5a);
            assert_eq!(rd(&mut c, i), i ^ 0x5a, "register {i:#x}");
        }
        // Port 0x70 is write-only.
        let mut b = [0u8];
        c.read(0x70, 0, &mut b);
        assert_eq!(b, [0xff]);
    }

    #[test]
    fn wide_access_splits_into_ports() {
        let (mut c, _) = cmos_at(T0);
        c.write(0x70, 0, &[0x40, 0x77]); // outw: index then data
        assert_eq!(rd(&mut c, 0x40), 0x77);
        c.write(0x70, 0, &[REG_D]);
        let mut w = [0u8; 4];
        c.read(0x70, 0, &mut w);
        assert_eq!(w, [0xff, 0x80, 0xff, 0xff]);
    }

    #[test]
    fn memory_registers_64m() {
        let (mut c, _) = cmos_at(T0);
        let regs = [
            0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5b, 0x5c, 0x5d,
        ];
        let got = regs.map(|r| rd(&mut c, r));
        // 640 KiB; 63 MiB = 0xfc00 KiB; 48 MiB = 0x300 * 64 KiB; nothing above 4 GiB.
        assert_eq!(
            got,
            [0x80, 0x02, 0x00, 0xfc, 0x00, 0xfc, 0x00, 0x03, 0, 0, 0]
        );
    }

    #[test]
    fn memory_registers_6g() {
        let mut c = Cmos::with_host_clock(3 * GIB, 3 * GIB);
        let regs = [
            0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5b, 0x5c, 0x5d,
        ];
        let got = regs.map(|r| rd(&mut c, r));
        // Extended memory capped; 3056 MiB = 0xbf00 * 64 KiB; 3 GiB = 0xc000 * 64 KiB.
        assert_eq!(
            got,
            [
                0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0xbf, 0x00, 0xc0, 0x00
            ]
        );
        // Caps: more than 64 KiB * 0xffff below and 2^24 blocks above.
        let mut c = Cmos::with_host_clock(u64::MAX, u64::MAX);
        let got = [0x34, 0x35, 0x5b, 0x5c, 0x5d].map(|r| rd(&mut c, r));
        assert_eq!(got, [0xff; 5]);
        let mut c = Cmos::with_host_clock(0, 0);
        assert_eq!([0x17, 0x18, 0x34, 0x35].map(|r| rd(&mut c, r)), [0; 4]);
    }

    #[test]
    fn hostile_sweep_does_not_panic() {
        for start in [i64::MIN, -1, 0, T0, i64::MAX] {
            let (mut c, now) = cmos_at(start);
            for mode in [0u8, B_24H, B_BINARY, B_BINARY | B_24H, B_SET, 0xff] {
                for index in 0..=255u8 {
                    for size in [1usize, 2, 4, 8] {
                        for offset in 0..=8u64 {
                            let mut buf = [0u8; 8];
                            c.write(0x70, 0, &[index]);
                            c.read(0x70, offset, &mut buf[..size]);
                            c.write(0x70, 0, &[index]);
                            c.write(0x70, offset, &[index; 8][..size]);
                            c.write(0x70, offset, &[!index; 8][..size]);
                        }
                    }
                    wr(&mut c, REG_B, mode);
                }
                now.fetch_add(1, Ordering::SeqCst);
            }
            c.read(0x70, u64::MAX, &mut [0u8; 8]);
            c.write(0x70, u64::MAX, &[0u8; 8]);
            c.read(0x70, 0, &mut []);
            c.write(0x70, 1, &[]);
        }
    }
}
