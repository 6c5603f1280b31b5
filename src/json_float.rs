//! Floating-point values in pipe's JSON records. JSON has no NaN or infinity (serde_json writes
//! them as `null`, which then does not read back as a number), so a non-finite value is written
//! as the string `"NaN"`, `"inf"` or `"-inf"`; finite values stay plain numbers. Reading takes
//! either, and `null` (what older records hold) as NaN, so every value written reads back.
//!
//! Use on a field: `#[serde(with = "crate::json_float")]`.

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    match *value {
        v if v.is_finite() => serializer.serialize_f64(v),
        v if v.is_nan() => serializer.serialize_str("NaN"),
        v if v > 0.0 => serializer.serialize_str("inf"),
        _ => serializer.serialize_str("-inf"),
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Number(f64),
        Word(String),
        Null(()),
    }
    match Written::deserialize(deserializer)? {
        Written::Number(v) => Ok(v),
        Written::Null(()) => Ok(f64::NAN),
        Written::Word(word) => match word.as_str() {
            "NaN" => Ok(f64::NAN),
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            other => Err(serde::de::Error::custom(format!(
                "expected a number, \"NaN\", \"inf\" or \"-inf\", found \"{other}\""
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct Record {
        #[serde(with = "super")]
        value: f64,
    }

    #[test]
    fn every_value_reads_back_as_written() {
        for value in [0.0, -1.5, 1e300, f64::MIN_POSITIVE, f64::INFINITY, f64::NEG_INFINITY] {
            let text = serde_json::to_string(&Record { value }).unwrap();
            assert_eq!(serde_json::from_str::<Record>(&text).unwrap().value, value, "{text}");
        }
        let nan = serde_json::to_string(&Record { value: f64::NAN }).unwrap();
        assert_eq!(nan, r#"{"value":"NaN"}"#);
        assert!(serde_json::from_str::<Record>(&nan).unwrap().value.is_nan());
        assert!(serde_json::from_str::<Record>(r#"{"value":null}"#).unwrap().value.is_nan());
        assert!(serde_json::from_str::<Record>(r#"{"value":"big"}"#).is_err());
    }
}

/// `Option<f64>` as the above, for fields written only when there is a value: use with
/// `#[serde(default, skip_serializing_if = "Option::is_none", with = "crate::json_float::optional")]`.
pub mod optional {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<f64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => super::serialize(v, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
        super::deserialize(deserializer).map(Some)
    }
}

/// A float that reads and writes as the above, for maps of named figures.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, Deserialize)]
#[serde(transparent)]
pub struct Float(#[serde(with = "self")] pub f64);
