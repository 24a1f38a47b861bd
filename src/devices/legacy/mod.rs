//! Legacy PC devices on the I/O port bus: 16550 UART, CMOS RTC, i8042.

pub mod cmos;
pub mod i8042;
pub mod serial;
