//! The registry tree behind `zk_*`, and its one validator: used by a single node (its own tree) and by the
//! cluster (the tree in the replicated state), so both modes keep the same rules and limits.
//!
//! Paths are absolute (`/a/b`), UTF-8, without empty components or a trailing slash. Creating a node creates
//! its missing parents (with empty data); deleting a node deletes its subtree. Limits bound a path, a node's
//! data, the number of nodes and the total bytes (paths, data and [`NODE_OVERHEAD`] per node). In a
//! cluster the proposer checks them before proposing and the state machine again when it applies the
//! entry, with the limits the entry carries (so every node decides alike whatever its own config).

use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{Deserialize, Serialize};

/// Bytes counted per node on top of its path and data (the map's own cost, roughly).
pub const NODE_OVERHEAD: u64 = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryLimits {
    pub max_nodes: u64,
    pub max_path_bytes: u64,
    pub max_data_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_nodes: 100_000,
            max_path_bytes: 1024,
            max_data_bytes: 1 << 20,
            max_total_bytes: 32 << 20,
        }
    }
}

/// Why a registry call is refused (the text goes back to the client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a call's path (and data, for a create) against the limits; the path as text.
pub fn check<'a>(
    path: &'a [u8],
    data: Option<&[u8]>,
    limits: &RegistryLimits,
) -> Result<&'a str, Refusal> {
    if path.len() as u64 > limits.max_path_bytes {
        return Err(Refusal(format!(
            "registry path of {} bytes exceeds {}",
            path.len(),
            limits.max_path_bytes
        )));
    }
    let p = std::str::from_utf8(path).map_err(|_| Refusal("registry path is not UTF-8".into()))?;
    if !valid_path(p) {
        return Err(Refusal(format!(
            "invalid registry path {p:?}: absolute, no empty component, no trailing slash"
        )));
    }
    if let Some(data) = data {
        if data.len() as u64 > limits.max_data_bytes {
            return Err(Refusal(format!(
                "registry data of {} bytes exceeds {}",
                data.len(),
                limits.max_data_bytes
            )));
        }
    }
    Ok(p)
}

/// Absolute, at least one component, no empty component, no trailing slash.
pub fn valid_path(p: &str) -> bool {
    p.starts_with('/') && p.len() >= 2 && !p.ends_with('/') && !p.contains("//")
}

/// The tree. Serialised as the plain map of paths to data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "BTreeMap<String, Vec<u8>>")]
pub struct Tree {
    nodes: BTreeMap<String, Vec<u8>>,
    /// Paths, data and overhead of every node.
    bytes: u64,
}

impl From<BTreeMap<String, Vec<u8>>> for Tree {
    fn from(nodes: BTreeMap<String, Vec<u8>>) -> Self {
        let bytes = nodes.iter().map(|(k, v)| cost(k, v)).sum();
        Tree { nodes, bytes }
    }
}

impl Serialize for Tree {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.nodes.serialize(s)
    }
}

fn cost(path: &str, data: &[u8]) -> u64 {
    path.len() as u64 + data.len() as u64 + NODE_OVERHEAD
}

impl Tree {
    /// Whether `create` would succeed now, without creating anything: a proposer's check before it
    /// proposes (the entry is checked again when applied, against the state then).
    pub fn would_create(
        &self,
        path: &str,
        data: &[u8],
        limits: &RegistryLimits,
    ) -> Result<(), Refusal> {
        self.plan(path, data, Some(limits)).map(drop)
    }

    /// Creates `path` with `data` and its missing parents. `Ok(false)`: it existed. With `limits`, refuses
    /// what would pass them (nothing is created then).
    pub fn create(
        &mut self,
        path: &str,
        data: &[u8],
        limits: Option<&RegistryLimits>,
    ) -> Result<bool, Refusal> {
        let Some((missing, added)) = self.plan(path, data, limits)? else {
            return Ok(false);
        };
        let missing: Vec<String> = missing.into_iter().map(str::to_owned).collect();
        for a in missing {
            let d = if a == path { data.to_vec() } else { Vec::new() };
            self.nodes.insert(a, d);
        }
        self.bytes += added;
        Ok(true)
    }

    /// The nodes a create would add and their bytes (`None`: the path exists), or why it is refused.
    #[allow(clippy::type_complexity)]
    fn plan<'p>(
        &self,
        path: &'p str,
        data: &[u8],
        limits: Option<&RegistryLimits>,
    ) -> Result<Option<(Vec<&'p str>, u64)>, Refusal> {
        if let Some(l) = limits {
            check(path.as_bytes(), Some(data), l)?;
        } else if !valid_path(path) {
            return Err(Refusal(format!("invalid registry path {path:?}")));
        }
        if self.nodes.contains_key(path) {
            return Ok(None);
        }
        let missing: Vec<&str> = path
            .match_indices('/')
            .skip(1)
            .map(|(i, _)| &path[..i])
            .filter(|a| !self.nodes.contains_key(*a))
            .chain(std::iter::once(path))
            .collect();
        let added: u64 = missing
            .iter()
            .map(|a| cost(a, if *a == path { data } else { &[] }))
            .sum();
        if let Some(l) = limits {
            if self.nodes.len() as u64 + missing.len() as u64 > l.max_nodes {
                return Err(Refusal(format!("registry is full ({} nodes)", l.max_nodes)));
            }
            if self.bytes + added > l.max_total_bytes {
                return Err(Refusal(format!(
                    "registry is full ({} of {} bytes used)",
                    self.bytes, l.max_total_bytes
                )));
            }
        }
        Ok(Some((missing, added)))
    }

    /// The sorted names of the node's children (none for a missing node); `/` lists the top level.
    pub fn children(&self, path: &str) -> Vec<String> {
        let prefix = if path == "/" {
            "/".to_owned()
        } else {
            format!("{path}/")
        };
        self.nodes
            .range::<str, _>((Bound::Excluded(prefix.as_str()), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/'))
            .map(|(k, _)| k[prefix.len()..].to_owned())
            .collect()
    }

    pub fn get(&self, path: &str) -> Option<&[u8]> {
        self.nodes.get(path).map(Vec::as_slice)
    }

    /// True if the node existed; its subtree goes with it.
    pub fn delete(&mut self, path: &str) -> bool {
        let Some(data) = self.nodes.remove(path) else {
            return false;
        };
        self.bytes -= cost(path, &data);
        let prefix = format!("{path}/");
        let below: Vec<String> = self
            .nodes
            .range::<str, _>((Bound::Excluded(prefix.as_str()), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            if let Some(d) = self.nodes.remove(&k) {
                self.bytes -= cost(&k, &d);
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Paths, data and overhead of every node.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RegistryLimits {
        RegistryLimits {
            max_nodes: 5,
            max_path_bytes: 32,
            max_data_bytes: 16,
            max_total_bytes: 400,
        }
    }

    #[test]
    fn tree_operations_and_byte_accounting() {
        let mut t = Tree::default();
        let l = limits();
        assert_eq!(t.create("/a/b/c", b"d", Some(&l)), Ok(true));
        assert_eq!(t.create("/a/b/c", b"d", Some(&l)), Ok(false));
        assert_eq!(t.create("/a/b", b"", Some(&l)), Ok(false));
        assert_eq!(t.children("/a"), vec!["b"]);
        assert_eq!(t.children("/"), vec!["a"]);
        assert_eq!(t.get("/a/b/c"), Some(&b"d"[..]));
        let used = t.bytes();
        assert_eq!(used, 3 * NODE_OVERHEAD + 2 + 4 + 6 + 1);
        assert!(t.delete("/a/b"));
        assert_eq!(t.bytes(), NODE_OVERHEAD + 2);
        assert!(!t.delete("/a/b"));
        // The serialised form is the plain map; the byte count is rebuilt on load.
        assert_eq!(t.create("/x", b"12345", Some(&l)), Ok(true));
        let json = serde_json::to_string(&t).unwrap();
        let back: Tree = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.bytes(), t.bytes());
    }

    #[test]
    fn every_limit_refuses_and_creates_nothing() {
        let l = limits();
        let mut t = Tree::default();
        assert!(t
            .create(&format!("/{}", "p".repeat(40)), b"", Some(&l))
            .is_err());
        assert!(t.create("/big", &[0; 17], Some(&l)).is_err());
        assert!(t.create("/a//b", b"", Some(&l)).is_err());
        assert!(check(&[b'/', 0xff], None, &l).is_err());
        assert_eq!(t.create("/1/2/3/4", b"", Some(&l)), Ok(true));
        let before = t.clone();
        // Two more nodes would make 6 > 5: the proposer's check says so too, and changes nothing.
        assert!(t
            .would_create("/5/6", b"", &l)
            .unwrap_err()
            .0
            .contains("full"));
        assert_eq!(t.would_create("/1/2", b"", &l), Ok(()));
        assert!(t
            .create("/5/6", b"", Some(&l))
            .unwrap_err()
            .0
            .contains("full"));
        assert_eq!(t, before);
        // Bytes: 4 nodes use 4 × 48 + 20 = 212; one more of 48 + 5 + 16 stays under 400, the next does not.
        assert_eq!(t.create("/five", &[1; 16], Some(&l)), Ok(true));
        let mut small = l;
        small.max_nodes = 100;
        small.max_total_bytes = t.bytes() + NODE_OVERHEAD;
        assert!(t
            .create("/six", b"", Some(&small))
            .unwrap_err()
            .0
            .contains("bytes"));
        // Without limits (entries written before limits travelled with them) only the path rules hold.
        assert_eq!(t.create("/six", b"", None), Ok(true));
    }
}
