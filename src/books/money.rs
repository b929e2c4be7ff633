//! Money: integer base units of the settlement token (18 decimals, like ether and most
//! ERC-20s), never floats. Prices are per 1000 tokens, per model; a task's charge is
//! rounded up to the next base unit, so the network never undercharges by rounding.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An amount in base units (1e-18 of the settlement token).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Units(pub u128);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not an amount: give a whole number of base units, e.g. \"1000000000000000\"")]
    NotAnAmount(String),
    #[error("amount overflow")]
    Overflow,
}

impl Units {
    pub const ZERO: Units = Units(0);

    pub fn checked_add(self, other: Units) -> Result<Units, MoneyError> {
        self.0.checked_add(other.0).map(Units).ok_or(MoneyError::Overflow)
    }

    pub fn checked_sub(self, other: Units) -> Option<Units> {
        self.0.checked_sub(other.0).map(Units)
    }
}

impl std::fmt::Display for Units {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Units {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, MoneyError> {
        let t = s.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(MoneyError::NotAnAmount(s.to_string()));
        }
        t.parse::<u128>().map(Units).map_err(|_| MoneyError::Overflow)
    }
}

// Amounts travel as decimal strings: JSON numbers lose precision past 2^53.
impl Serialize for Units {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Units {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Price of a model per 1000 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Price {
    pub prompt_per_1k: Units,
    pub completion_per_1k: Units,
}

impl Price {
    /// What a task costs, rounded up to a whole base unit.
    pub fn charge(&self, prompt_tokens: u64, completion_tokens: u64) -> Result<Units, MoneyError> {
        let p = self.prompt_per_1k.0.checked_mul(prompt_tokens as u128).ok_or(MoneyError::Overflow)?;
        let c = self.completion_per_1k.0.checked_mul(completion_tokens as u128).ok_or(MoneyError::Overflow)?;
        let total = p.checked_add(c).ok_or(MoneyError::Overflow)?;
        Ok(Units(total.div_ceil(1000)))
    }
}

/// Prices by model, with a default for models not listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    pub default: Price,
    pub models: HashMap<String, Price>,
}

impl PriceTable {
    pub fn for_model(&self, model: &str) -> Price {
        self.models.get(model).copied().unwrap_or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_round_up_and_never_use_floats() {
        let price = Price { prompt_per_1k: Units(1000), completion_per_1k: Units(3000) };
        assert_eq!(price.charge(1, 0).unwrap(), Units(1));
        assert_eq!(price.charge(1000, 1000).unwrap(), Units(4000));
        let odd = Price { prompt_per_1k: Units(1), completion_per_1k: Units(0) };
        assert_eq!(odd.charge(1, 0).unwrap(), Units(1), "a fraction of a unit rounds up");
        assert_eq!(odd.charge(0, 0).unwrap(), Units(0));
        // 10^30 base units per 1k tokens (a trillion tokens) still computes exactly.
        let big = Price { prompt_per_1k: Units(10u128.pow(30)), completion_per_1k: Units(0) };
        assert_eq!(big.charge(2_000, 0).unwrap(), Units(2 * 10u128.pow(30)));
        let huge = Price { prompt_per_1k: Units(u128::MAX / 2), completion_per_1k: Units(0) };
        assert_eq!(huge.charge(u64::MAX, 0), Err(MoneyError::Overflow));
    }

    #[test]
    fn amounts_parse_strictly_and_serialize_as_strings() {
        assert_eq!("123".parse::<Units>().unwrap(), Units(123));
        for bad in ["", "-1", "1.5", "1e18", " ", "0x10"] {
            assert!(bad.parse::<Units>().is_err(), "{bad}");
        }
        assert!("340282366920938463463374607431768211456".parse::<Units>().is_err(), "2^128 overflows");
        let json = serde_json::to_string(&Units(10u128.pow(20))).unwrap();
        assert_eq!(json, "\"100000000000000000000\"");
        assert_eq!(serde_json::from_str::<Units>(&json).unwrap(), Units(10u128.pow(20)));
    }
}
