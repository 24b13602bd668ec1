//! Cost ceilings: per session, and per person per (UTC) day across all their sessions; checked before a
//! prompt is dispatched and on every `usage` event.
//!
//! Usage whose cost is known counts against a cost ceiling; usage without a price counts against a token
//! ceiling instead (for a session: once its total cost is unknown), so a model without a price cannot
//! run unbounded.

use nightshift_protocol::http::UsageTotals;

/// Default cost ceiling of one session, in US dollars.
pub const DEFAULT_SESSION_COST_CEILING_USD: f64 = 25.0;
/// Default token ceiling of one session (input + output), for usage without a known price.
pub const DEFAULT_SESSION_TOKEN_CEILING: u64 = 5_000_000;

/// Default cost ceiling of one person per UTC day, across their sessions, in US dollars.
pub const DEFAULT_USER_DAILY_COST_CEILING_USD: f64 = 100.0;
/// Default ceiling of one person's tokens without a known price per UTC day.
pub const DEFAULT_USER_DAILY_TOKEN_CEILING: u64 = 20_000_000;
/// One day, the period of a person's ceiling (UTC days: `now_ms / DAY_MS`).
pub const DAY_MS: u64 = 24 * 3600 * 1000;

/// The ceilings in force for a session (missing fields of a stored record take the defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CostCeilings {
    /// Most a session may cost, in US dollars.
    pub session_cost_usd: f64,
    /// Most tokens (input + output) a session may use when its cost is unknown.
    pub session_tokens: u64,
    /// Most one person's priced usage may cost per UTC day, across their sessions.
    pub user_daily_cost_usd: f64,
    /// Most tokens without a price one person may use per UTC day, across their sessions.
    pub user_daily_tokens: u64,
}

impl Default for CostCeilings {
    fn default() -> Self {
        CostCeilings {
            session_cost_usd: DEFAULT_SESSION_COST_CEILING_USD,
            session_tokens: DEFAULT_SESSION_TOKEN_CEILING,
            user_daily_cost_usd: DEFAULT_USER_DAILY_COST_CEILING_USD,
            user_daily_tokens: DEFAULT_USER_DAILY_TOKEN_CEILING,
        }
    }
}

/// One person's usage on one UTC day across all their sessions (kept by their `UserObject`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DailySpend {
    /// The UTC day (`ms / DAY_MS`).
    pub day: u64,
    /// Cost of the usage that had a price, in US dollars.
    pub cost_usd: f64,
    /// Tokens (input + output) of the usage that had none.
    pub unpriced_tokens: u64,
}

impl DailySpend {
    /// Add one `usage`: its cost when it has one, else its tokens.
    pub fn add(&mut self, cost_usd: Option<f64>, tokens: u64) {
        match cost_usd {
            Some(cost) if cost.is_finite() && cost > 0.0 => self.cost_usd += cost,
            Some(_) => {}
            None => self.unpriced_tokens = self.unpriced_tokens.saturating_add(tokens),
        }
    }
}

/// A person's usage to add to their day (the object sends it to their `UserObject`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsageReport {
    /// Whose prompt used it.
    pub login: String,
    /// The UTC day.
    pub day: u64,
    /// Its cost, when it has a price.
    pub cost_usd: Option<f64>,
    /// Its tokens (input + output).
    pub tokens: u64,
}

impl CostCeilings {
    /// Why `usage` is at or over a ceiling, as people read it; `None` while it is under.
    pub fn breach(&self, usage: &UsageTotals) -> Option<String> {
        let tokens = usage.input_tokens.saturating_add(usage.output_tokens);
        match usage.cost_usd {
            Some(cost) if cost >= self.session_cost_usd => Some(format!(
                "the session reached its cost ceiling (${cost:.2} of ${:.2})",
                self.session_cost_usd
            )),
            None if tokens > 0 && tokens >= self.session_tokens => Some(format!(
                "the session reached its token ceiling ({tokens} of {} tokens; the model's cost is unknown)",
                self.session_tokens
            )),
            _ => None,
        }
    }

    /// Why one person's `spend` today is at or over their daily ceiling; `None` while it is under.
    pub fn user_breach(&self, login: &str, spend: &DailySpend) -> Option<String> {
        if spend.cost_usd >= self.user_daily_cost_usd {
            Some(format!(
                "{login} reached their daily cost ceiling (${:.2} of ${:.2} today)",
                spend.cost_usd, self.user_daily_cost_usd
            ))
        } else if spend.unpriced_tokens > 0 && spend.unpriced_tokens >= self.user_daily_tokens {
            Some(format!(
                "{login} reached their daily token ceiling ({} of {} tokens without a price today)",
                spend.unpriced_tokens, self.user_daily_tokens
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(tokens: u64, cost_usd: Option<f64>) -> UsageTotals {
        UsageTotals {
            input_tokens: tokens,
            output_tokens: 0,
            cost_usd,
        }
    }

    #[test]
    fn known_cost_counts_against_the_cost_ceiling_and_unknown_cost_against_tokens() {
        let ceilings = CostCeilings {
            session_cost_usd: 1.0,
            session_tokens: 1_000,
            ..CostCeilings::default()
        };
        assert_eq!(ceilings.breach(&usage(10_000, Some(0.5))), None);
        assert!(ceilings
            .breach(&usage(10, Some(1.0)))
            .is_some_and(|why| why.contains("cost ceiling ($1.00 of $1.00)")));
        assert_eq!(ceilings.breach(&usage(999, None)), None);
        assert!(ceilings
            .breach(&usage(1_000, None))
            .is_some_and(|why| why.contains("token ceiling (1000 of 1000 tokens")));
        assert_eq!(ceilings.breach(&usage(0, None)), None, "nothing used yet");
    }

    #[test]
    fn a_day_adds_priced_usage_as_cost_and_the_rest_as_tokens() {
        let ceilings = CostCeilings {
            user_daily_cost_usd: 2.0,
            user_daily_tokens: 500,
            ..CostCeilings::default()
        };
        let mut day = DailySpend::default();
        day.add(Some(1.5), 10_000);
        day.add(None, 400);
        assert_eq!(ceilings.user_breach("ada", &day), None);
        day.add(Some(0.5), 1);
        assert!(ceilings.user_breach("ada", &day).is_some_and(
            |why| why.contains("ada reached their daily cost ceiling ($2.00 of $2.00")
        ));
        let mut tokens = DailySpend::default();
        tokens.add(None, 500);
        assert!(ceilings
            .user_breach("bob", &tokens)
            .is_some_and(|why| why.contains("daily token ceiling (500 of 500")));
    }
}
