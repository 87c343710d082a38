//! `zk_*`: a small path tree (it replaces FAE's ZooKeeper). On a single node this is the tree; in a cluster
//! the tree lives in the replicated state (`fae_cluster::registry`, the same implementation and validator),
//! and this one only checks calls before they are proposed.
//!
//! Paths are absolute (`/a/b`), without empty components or a trailing slash. Creating a node creates its
//! missing parents (with empty data); deleting a node deletes its subtree.

use std::sync::RwLock;

use fae_cluster::registry::{self, RegistryLimits, Tree};

use super::CallError;
use crate::config::RegistryConfig;
use crate::wire::{ttype, Encoder};

pub struct Registry {
    tree: RwLock<Tree>,
    limits: RegistryLimits,
}

fn refused(e: registry::Refusal) -> CallError {
    CallError::refused(e.0)
}

impl Registry {
    pub fn new(cfg: &RegistryConfig) -> Self {
        Registry {
            tree: RwLock::new(Tree::default()),
            limits: cfg.limits(),
        }
    }

    /// The `[registry]` limits (a cluster proposal carries them).
    pub fn limits(&self) -> RegistryLimits {
        self.limits
    }

    /// The checks of a call's path (and data, for a create) against `[registry]`, shared by the node's own
    /// registry and the cluster's (which runs them before it proposes anything to raft).
    pub fn check<'a>(&self, path: &'a [u8], data: Option<&[u8]>) -> Result<&'a str, CallError> {
        registry::check(path, data, &self.limits).map_err(refused)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tree> {
        self.tree.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|e| e.into_inner())
    }

    /// True if the node was created, false if it already existed.
    pub fn create(&self, path: &[u8], data: &[u8]) -> Result<bool, CallError> {
        let p = self.check(path, Some(data))?;
        self.write()
            .create(p, data, Some(&self.limits))
            .map_err(refused)
    }

    /// The sorted names of the node's children (none for a missing node).
    pub fn children(&self, path: &[u8], out: &mut Encoder<'_>) -> Result<(), CallError> {
        encode_children(out, &self.child_names(path)?);
        Ok(())
    }

    pub fn child_names(&self, path: &[u8]) -> Result<Vec<String>, CallError> {
        let p = self.check(path, None)?;
        Ok(self.read().children(p))
    }

    /// True if the node existed; its subtree goes with it.
    pub fn delete(&self, path: &[u8]) -> Result<bool, CallError> {
        let p = self.check(path, None)?;
        Ok(self.write().delete(p))
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A `zk_children` result: the names as result field 0 (shared with the cluster's registry).
pub fn encode_children(out: &mut Encoder<'_>, names: &[String]) {
    out.field_begin(ttype::LIST, 0);
    out.list_begin(ttype::STRING, names.len());
    for n in names {
        out.bytes(n.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        Registry::new(&RegistryConfig {
            max_nodes: 10,
            max_data_bytes: 16,
            max_path_bytes: 64,
            max_total_bytes: 1 << 20,
        })
    }

    #[test]
    fn tree_operations() {
        let r = reg();
        assert!(r.create(b"/svc/a", b"1").unwrap());
        assert!(!r.create(b"/svc/a", b"2").unwrap());
        assert!(r.create(b"/svc/b", b"").unwrap());
        assert!(r.create(b"/svc/a/deep", b"").unwrap());
        assert!(r.create(b"/svcx", b"").unwrap());
        assert_eq!(r.child_names(b"/svc").unwrap(), ["a", "b"]);
        assert!(r.child_names(b"/none").unwrap().is_empty());
        assert!(r.delete(b"/svc/a").unwrap());
        assert!(!r.delete(b"/svc/a").unwrap());
        assert!(r.child_names(b"/svc/a").unwrap().is_empty());
        assert_eq!(r.child_names(b"/svc").unwrap(), ["b"]);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn bad_paths_and_bounds() {
        let r = reg();
        for p in [&b"a"[..], b"/", b"/a/", b"/a//b", b""] {
            assert!(r.create(p, b"").is_err(), "{:?}", p);
        }
        assert!(r.create(b"/x", &[0; 17]).is_err());
        assert!(
            r.create(b"/1/2/3/4/5/6/7/8/9/10/11", b"").is_err(),
            "node cap"
        );
        assert!(r.is_empty());
    }
}
