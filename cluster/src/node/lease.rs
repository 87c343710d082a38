//! The self-fencing lease: a ReadIndex a quorum confirmed lets this node serve keyed calls for a while.

use super::*;

impl Node {
    pub(super) fn probe_lease(&mut self, now: Instant) {
        // raft-rs drops a ReadIndex it cannot serve (no leader yet, nothing committed in this term): ask
        // again well before the lease would lapse.
        if let Some((_, asked)) = self.lease_probe {
            if now.duration_since(asked) < self.cfg.lease() / 4 {
                return;
            }
        }
        if !self.leader_known() {
            return;
        }
        let seq = self.seq();
        self.raw.read_index(seq.to_le_bytes().to_vec());
        self.lease_probe = Some((seq, now));
    }

    pub(super) fn finish_reads(&mut self) {
        let applied = self.applied;
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(index, _)| *index <= applied)
            .map(|(_, seq)| *seq)
            .collect();
        self.reads.retain(|(index, _)| *index > applied);
        for seq in ready {
            if let Some((probe, asked)) = self.lease_probe {
                if probe == seq {
                    self.lease_probe = None;
                    let until = asked + self.cfg.lease();
                    let ms = until.saturating_duration_since(self.shared.t0).as_millis() as u64;
                    self.shared.lease_until.fetch_max(ms, Ordering::AcqRel);
                    continue;
                }
            }
            if let Some((_, Pending::Read(path, reply))) = self.pending.remove(&seq) {
                let _ = reply.try_send(Ok(self.sm.registry_children(&path)));
            }
        }
    }
}
