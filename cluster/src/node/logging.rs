//! raft-rs logs through slog; this hands its records to `tracing`.

/// raft's slog records, forwarded to `tracing` (raft's info level is chatty: it becomes debug).
pub(super) struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, r: &slog::Record<'_>, kv: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut text = KvText(String::new());
        let _ = r.kv().serialize(r, &mut text);
        let _ = kv.serialize(r, &mut text);
        match r.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}{}", r.msg(), text.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}{}", r.msg(), text.0),
            slog::Level::Info => tracing::debug!(target: "raft", "{}{}", r.msg(), text.0),
            _ => tracing::trace!(target: "raft", "{}{}", r.msg(), text.0),
        }
        Ok(())
    }
}
