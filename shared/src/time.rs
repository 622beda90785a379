//! Times as walvault stores and exchanges them.
//!
//! * In archive metadata and JSON reports: RFC 3339 in UTC with microseconds
//!   (`2026-11-26T14:15:00.123456Z`), typed as `DateTime<Utc>` in code ([`rfc3339`] and
//!   [`rfc3339_opt`] are the serde adapters). Readers also accept any RFC 3339 offset.
//! * On the replication wire and inside WAL records: PostgreSQL's `TimestampTz`, microseconds
//!   since 2000-01-01 00:00 UTC ([`PG_EPOCH_UNIX`], [`from_pg`], [`to_pg`]).

use chrono::{DateTime, Utc};

/// 2000-01-01 00:00:00 UTC as Unix seconds (PostgreSQL's `POSTGRES_EPOCH_JDATE`).
pub const PG_EPOCH_UNIX: i64 = 946_684_800;

/// PostgreSQL microseconds-since-2000 to UTC.
pub fn from_pg(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(PG_EPOCH_UNIX + micros.div_euclid(1_000_000), (micros.rem_euclid(1_000_000) * 1000) as u32)
        .unwrap_or_default()
}

/// UTC to PostgreSQL microseconds-since-2000.
pub fn to_pg(t: DateTime<Utc>) -> i64 {
    (t.timestamp() - PG_EPOCH_UNIX) * 1_000_000 + t.timestamp_subsec_micros() as i64
}

/// Now, to the microsecond (what the text form keeps, so a stored time reads back equal).
pub fn now() -> DateTime<Utc> {
    use chrono::SubsecRound;
    (Utc::now() + test_skew()).trunc_subsecs(6)
}

/// Tests (debug builds only) give a process a wrong clock with `WALVAULT_TEST_CLOCK_SKEW_MS`
/// (signed milliseconds added to every time this module hands out).
#[cfg(debug_assertions)]
fn test_skew() -> chrono::Duration {
    static SKEW: std::sync::OnceLock<chrono::Duration> = std::sync::OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var("WALVAULT_TEST_CLOCK_SKEW_MS")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .map(chrono::Duration::milliseconds)
            .unwrap_or_else(chrono::Duration::zero)
    })
}

#[cfg(not(debug_assertions))]
fn test_skew() -> chrono::Duration {
    chrono::Duration::zero()
}

/// The text form: RFC 3339, UTC, microseconds.
pub fn text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Parse RFC 3339 with any offset into UTC.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// serde adapter: `DateTime<Utc>` as RFC 3339 text with microseconds.
pub mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::text(*t))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}")))
    }
}

/// serde adapter: `Option<DateTime<Utc>>` as RFC 3339 text (absent or null: `None`).
pub mod rfc3339_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::text(*t)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| super::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}"))))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let t = parse("2026-11-26T15:15:00.123456+01:00").unwrap();
        assert_eq!(text(t), "2026-11-26T14:15:00.123456Z");
        assert_eq!(from_pg(to_pg(t)), t);
        assert_eq!(from_pg(0), parse("2000-01-01T00:00:00Z").unwrap());
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S {
            #[serde(with = "rfc3339")]
            a: DateTime<Utc>,
            #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
            b: Option<DateTime<Utc>>,
        }
        let s = S { a: t, b: None };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, r#"{"a":"2026-11-26T14:15:00.123456Z"}"#);
        assert_eq!(serde_json::from_str::<S>(&j).unwrap(), s);
        assert!(serde_json::from_str::<S>(r#"{"a":"yesterday"}"#).is_err());
    }
}
