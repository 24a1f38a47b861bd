//! ACPI tables for a machine (being written).
