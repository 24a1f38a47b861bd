//! TEMPORARY STUB (replaced by the real watcher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Changed(Vec<u8>),
    Deleted,
    Unreadable(String),
}
pub const QUIET: std::time::Duration = std::time::Duration::from_millis(3);
pub struct Watcher;
impl Watcher {
    pub fn spawn(
        _path: &std::path::Path,
        _initial: Vec<u8>,
        _quiet: std::time::Duration,
        _on_event: impl FnMut(WatchEvent) + Send + 'static,
    ) -> std::io::Result<Watcher> {
        Ok(Watcher)
    }
}
