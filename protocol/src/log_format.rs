//! `--log-format text|json` (config key `log_format`), shared by the relay and both agents so the
//! flag reads and validates the same everywhere. Each binary sets up its own logger from it.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (colours only at a terminal).
    #[default]
    Text,
    /// One JSON object per line with the same fields (`timestamp`, `level`, `target`, the
    /// message and every field of the event at the top level, the spans in `spans`), for log
    /// shippers.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: use text or json")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_from_a_flag_and_a_config_key_alike() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!(LogFormat::default(), LogFormat::Text);
        assert!("JSON ".parse::<LogFormat>().is_err());
        #[derive(Deserialize)]
        struct C {
            log_format: LogFormat,
        }
        let c: C = from_json(r#"{"log_format":"json"}"#);
        assert_eq!(c.log_format, LogFormat::Json);
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(f.to_string().parse::<LogFormat>(), Ok(f));
        }
    }

    fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }
}
