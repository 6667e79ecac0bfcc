//! Strict JSON input: a key given twice in one object is an error.
//!
//! serde_json keeps the last of two equal keys (`{"Comment":"a",
//! "Comment":"b"}` reads as `"b"`), while a proxy or WAF in front of the
//! server may have judged the request by the first. Every JSON body the
//! server parses goes through [`from_slice`], which builds the document
//! with a visitor that refuses a repeated key at any depth, then turns it
//! into `T`.

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Parses `bytes` as JSON into `T`, refusing a key repeated in any object.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    serde_json::from_value(value_from_slice(bytes)?)
}

/// Parses `bytes` as a JSON document, refusing a key repeated in any object.
pub fn value_from_slice(bytes: &[u8]) -> serde_json::Result<Value> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = <StrictValue as de::Deserialize>::deserialize(&mut deserializer)?.0;
    deserializer.end()?;
    Ok(value)
}

/// A JSON value read through [`StrictVisitor`].
struct StrictValue(Value);

impl<'de> de::Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

/// Builds a [`Value`], refusing a key repeated in one object.
struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_none<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(StrictValue(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let shown: String = key.chars().take(100).collect();
                return Err(de::Error::custom(format_args!(
                    "the key '{shown}' is given twice in one object"
                )));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(StrictValue(Value::Object(object)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        for bad in [
            r#"{"Comment":"a","Comment":"b"}"#,
            r#"{"a":{"x":1,"x":2}}"#,
            r#"{"a":[{"k":1},{"k":1,"k":2}]}"#,
            r#"{"é":1,"\u00e9":2}"#,
        ] {
            let err = value_from_slice(bad.as_bytes()).unwrap_err().to_string();
            assert!(err.contains("given twice"), "{bad}: {err}");
        }
        // Equal keys in different objects, and keys differing in case, are fine.
        let ok = r#"{"a":{"k":1},"b":{"k":1},"K":[1,{"K":null}],"k":1.5}"#;
        let value = value_from_slice(ok.as_bytes()).unwrap();
        assert_eq!(value, serde_json::from_str::<Value>(ok).unwrap());
        assert!(value_from_slice(b"{} trailing").is_err());
        assert_eq!(from_slice::<i64>(b" 7 ").unwrap(), 7);
    }
}
