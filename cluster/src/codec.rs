//! How raft entries, their configuration-change contexts and snapshots are encoded: a version byte (1)
//! then postcard, a compact binary serde format (bytes are bytes, integers varints). Entries and snapshots
//! written before (JSON, which spelt every byte of a registry value as a decimal number: up to four times
//! the size, six for control bytes) are still read: JSON starts with `{`, never with 1.

use serde::de::DeserializeOwned;
use serde::Serialize;

const BINARY: u8 = 1;

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, vec![BINARY]).expect("the cluster's types always encode")
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.first() {
        Some(&BINARY) => postcard::from_bytes(&bytes[1..]).map_err(|e| e.to_string()),
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Some(b) => Err(format!("unknown encoding (first byte {b})")),
        None => Err("empty".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, StateMachine};

    #[test]
    fn binary_is_compact_and_json_is_still_read() {
        let cmd = Command::RegistryCreate {
            path: "/a".into(),
            data: (0u8..32).collect(),
            limits: None,
        };
        let bin = encode(&cmd);
        let json = serde_json::to_vec(&cmd).unwrap();
        assert!(bin.len() < 48, "{} bytes", bin.len());
        assert!(
            json.len() > 3 * bin.len(),
            "JSON {} vs {}",
            json.len(),
            bin.len()
        );
        assert_eq!(decode::<Command>(&bin).unwrap(), cmd);
        assert_eq!(decode::<Command>(&json).unwrap(), cmd);
        assert!(decode::<Command>(b"").is_err());
        assert!(decode::<Command>(&[9, 9]).is_err());
        let sm = StateMachine::default();
        assert_eq!(decode::<StateMachine>(&encode(&sm)).unwrap(), sm);
    }
}
