//! JSON parsing that refuses an object holding a key twice
//! ([`parse_unique_json`]), for headers, index files and mapping files.

use crate::error::shown;
use serde::Deserializer;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::borrow::Cow;
use std::cell::RefCell;

/// Why [`parse_unique_json`] refused its text.
#[derive(Debug, PartialEq, Eq)]
pub enum JsonError {
    /// Not JSON at all (serde_json's message, with line and column).
    Syntax(String),
    /// An object holds the same key twice.
    Duplicate(DuplicateKey),
}

/// A key found twice in one JSON object.
#[derive(Debug, PartialEq, Eq)]
pub struct DuplicateKey {
    /// The repeated key.
    pub key: String,
    /// The keys leading to the object that holds it, outermost first
    /// (empty for the top-level object).
    pub within: Vec<String>,
}

impl std::fmt::Display for DuplicateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the key '{}' appears twice", shown(&self.key))?;
        if !self.within.is_empty() {
            let path: Vec<Cow<'_, str>> = self.within.iter().map(|k| shown(k)).collect();
            write!(f, " inside '{}'", path.join("' > '"))?;
        }
        Ok(())
    }
}

/// Parses JSON text into a [`Value`], refusing any object that holds a key
/// twice. serde_json (and `json.loads`) silently keep the last of them, so a
/// repeated tensor name or mapping entry would otherwise lose the first
/// without a word, and other readers may keep a different one.
pub fn parse_unique_json(text: &str) -> Result<Value, JsonError> {
    let found = RefCell::new(None);
    let mut reader = serde_json::Deserializer::from_str(text);
    let seed = Unique {
        within: None,
        found: &found,
    };
    let parsed = seed.deserialize(&mut reader).and_then(|value| {
        reader.end()?;
        Ok(value)
    });
    match (parsed, found.into_inner()) {
        (_, Some(dup)) => Err(JsonError::Duplicate(dup)),
        (Ok(value), None) => Ok(value),
        (Err(e), None) => Err(JsonError::Syntax(e.to_string())),
    }
}

/// The key of the object being read, and the keys around it.
struct Scope<'a> {
    key: &'a str,
    parent: Option<&'a Scope<'a>>,
}

/// Builds a [`Value`] like serde_json's own deserializer, but stops at the
/// first key an object already holds, recording where it was.
#[derive(Clone, Copy)]
struct Unique<'a> {
    within: Option<&'a Scope<'a>>,
    found: &'a RefCell<Option<DuplicateKey>>,
}

impl<'de> DeserializeSeed<'de> for Unique<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, reader: D) -> Result<Value, D::Error> {
        reader.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let mut within = Vec::new();
                let mut scope = self.within;
                while let Some(s) = scope {
                    within.push(s.key.to_owned());
                    scope = s.parent;
                }
                within.reverse();
                *self.found.borrow_mut() = Some(DuplicateKey { key, within });
                return Err(serde::de::Error::custom("duplicate key"));
            }
            let scope = Scope {
                key: &key,
                parent: self.within,
            };
            let value = map.next_value_seed(Unique {
                within: Some(&scope),
                found: self.found,
            })?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_json_matches_serde_json_and_names_the_repeated_key() {
        let text =
            r#"{"b":[1,-2,3.5,1e300,null,true,"s\n",{"x":{}}],"a":{"c":18446744073709551615}}"#;
        assert_eq!(
            parse_unique_json(text),
            Ok(serde_json::from_str::<Value>(text).unwrap())
        );
        let dup = |text: &str| match parse_unique_json(text) {
            Err(JsonError::Duplicate(dup)) => dup.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(dup(r#"{"k":1,"k":1}"#), "the key 'k' appears twice");
        assert_eq!(
            dup(r#"{"w":{"a":{"x":1}},"m":[{"o":{"y":1,"y":2}}]}"#),
            "the key 'y' appears twice inside 'm' > 'o'"
        );
        assert_eq!(
            dup("{\"a\\n\":{\"b\":1,\"b\":2}}"),
            "the key 'b' appears twice inside 'a\\n'"
        );
        // The same key in two different objects is fine.
        assert!(parse_unique_json(r#"{"a":{"k":1},"b":{"k":1}}"#).is_ok());
        assert!(matches!(
            parse_unique_json(r#"{"a":1} x"#),
            Err(JsonError::Syntax(e)) if e.contains("trailing")
        ));
        assert!(matches!(
            parse_unique_json(r#"{"a":1,"#),
            Err(JsonError::Syntax(_))
        ));
    }
}
