//! `zk_*`: a small path tree (it replaces FAE's ZooKeeper). Node-local until the cluster keeps it in raft.
//!
//! Paths are absolute (`/a/b`), without empty components or a trailing slash. Creating a node creates its
//! missing parents (with empty data); deleting a node deletes its subtree.

use std::collections::BTreeMap;
use std::sync::RwLock;

use super::CallError;
use crate::config::RegistryConfig;
use crate::wire::{ttype, Encoder};

pub struct Registry {
    nodes: RwLock<BTreeMap<String, Vec<u8>>>,
    max_nodes: usize,
    max_data: usize,
    max_path: usize,
}

fn check_path(path: &[u8], max_path: usize) -> Result<&str, CallError> {
    let p =
        std::str::from_utf8(path).map_err(|_| CallError::refused("registry path is not UTF-8"))?;
    if p.len() > max_path {
        return Err(CallError::refused(format!(
            "registry path of {} bytes exceeds {max_path}",
            p.len()
        )));
    }
    if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') || p.contains("//") {
        return Err(CallError::refused(format!(
            "invalid registry path {p:?}: absolute, no empty component, no trailing slash"
        )));
    }
    Ok(p)
}

impl Registry {
    pub fn new(cfg: &RegistryConfig) -> Self {
        Registry {
            nodes: RwLock::new(BTreeMap::new()),
            max_nodes: cfg.max_nodes,
            max_data: cfg.max_data_bytes,
            max_path: cfg.max_path_bytes,
        }
    }

    /// The checks of a call's path (and data, for a create) against `[registry]`, shared by the node's own
    /// registry and the cluster's (which runs them before it proposes anything to raft).
    pub fn check<'a>(&self, path: &'a [u8], data: Option<&[u8]>) -> Result<&'a str, CallError> {
        let p = check_path(path, self.max_path)?;
        if let Some(data) = data {
            if data.len() > self.max_data {
                return Err(CallError::refused(format!(
                    "registry data of {} bytes exceeds {}",
                    data.len(),
                    self.max_data
                )));
            }
        }
        Ok(p)
    }

    /// True if the node was created, false if it already existed.
    pub fn create(&self, path: &[u8], data: &[u8]) -> Result<bool, CallError> {
        let p = self.check(path, Some(data))?;
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if nodes.contains_key(p) {
            return Ok(false);
        }
        let missing: Vec<&str> = p
            .match_indices('/')
            .skip(1)
            .map(|(i, _)| &p[..i])
            .chain(std::iter::once(p))
            .filter(|a| !nodes.contains_key(*a))
            .collect();
        if nodes.len() + missing.len() > self.max_nodes {
            return Err(CallError::refused(format!(
                "registry is full ({} nodes)",
                self.max_nodes
            )));
        }
        for a in missing {
            let d = if a == p { data.to_vec() } else { Vec::new() };
            nodes.insert(a.to_owned(), d);
        }
        Ok(true)
    }

    /// The sorted names of the node's children (none for a missing node).
    pub fn children(&self, path: &[u8], out: &mut Encoder<'_>) -> Result<(), CallError> {
        encode_children(out, &self.child_names(path)?);
        Ok(())
    }

    pub fn child_names(&self, path: &[u8]) -> Result<Vec<String>, CallError> {
        let p = check_path(path, self.max_path)?;
        let prefix = format!("{p}/");
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        Ok(nodes
            .range::<str, _>((
                std::ops::Bound::Excluded(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/'))
            .map(|(k, _)| k[prefix.len()..].to_owned())
            .collect())
    }

    /// True if the node existed; its subtree goes with it.
    pub fn delete(&self, path: &[u8]) -> Result<bool, CallError> {
        let p = check_path(path, self.max_path)?;
        let prefix = format!("{p}/");
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if nodes.remove(p).is_none() {
            return Ok(false);
        }
        let below: Vec<String> = nodes
            .range::<str, _>((
                std::ops::Bound::Excluded(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            nodes.remove(&k);
        }
        Ok(true)
    }

    pub fn len(&self) -> usize {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).len()
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
