//! Listeners published in etcd (`{prefix}/listeners/{name}`): a JSON object with the keys of a
//! TOML `[[listener]]`, checked by the same validation. The object becomes the listener of a
//! one-listener config document, so every rule (and every message) is the TOML one; positions
//! are dropped because the user wrote JSON, and the etcd key names the place instead.

use std::path::Path;

use super::{Config, ListenerConfig};

/// Validates the listener published as `name` with the JSON `value`; the error lists every
/// problem (in the TOML key names, which are the JSON keys).
pub fn listener_from_json(name: &str, value: &[u8]) -> Result<ListenerConfig, String> {
    let json: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("value is not valid JSON: {e}"))?;
    let serde_json::Value::Object(mut object) = json else {
        return Err("value must be a JSON object with the keys of a [[listener]]".into());
    };
    if let Some(n) = object.get("name")
        && n.as_str() != Some(name)
    {
        return Err(format!(
            "`name` {n} differs from the key's last segment {name:?}: drop `name` (the key names the listener)"
        ));
    }
    object.insert("name".into(), serde_json::Value::String(name.into()));
    if object.values().any(serde_json::Value::is_null) {
        return Err("null values are not allowed: leave the key out for its default".into());
    }
    let listener = toml::Value::try_from(serde_json::Value::Object(object))
        .map_err(|e| format!("value cannot be a listener: {e}"))?;
    let mut doc = toml::Table::new();
    doc.insert("listener".into(), toml::Value::Array(vec![listener]));
    let text = toml::to_string(&doc).map_err(|e| format!("value cannot be a listener: {e}"))?;
    match Config::parse(Path::new(name), &text) {
        Ok(mut c) if c.listeners.len() == 1 => Ok(c.listeners.remove(0)),
        Ok(_) => Err("value is not one listener".into()),
        Err(e) => Err(e
            .issues
            .iter()
            .map(|i| i.message.clone())
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_listener_is_validated_like_toml() {
        let l = listener_from_json(
            "web",
            br#"{"listen":"0.0.0.0:80","protocol":"http","service":"web","max_connections":10}"#,
        )
        .unwrap();
        assert_eq!(l.name, "web");
        assert_eq!(l.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(l.edge.max_connections, Some(10));
        let e = listener_from_json("m", br#"{"listen":"0.0.0.0:1883"}"#).unwrap_err();
        assert!(e.contains("service"), "{e}");
        let e = listener_from_json("m", br#"{"listen":"nowhere","service":"x"}"#).unwrap_err();
        assert!(e.contains("listen"), "{e}");
        let e = listener_from_json("m", br#"{"listen":"0.0.0.0:1","service":"x","bogus":1}"#)
            .unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        assert!(listener_from_json("m", b"[1]").is_err());
        assert!(listener_from_json("m", b"{").is_err());
        let e = listener_from_json(
            "m",
            br#"{"name":"other","listen":"0.0.0.0:1","service":"x"}"#,
        )
        .unwrap_err();
        assert!(e.contains("key"), "{e}");
    }
}
