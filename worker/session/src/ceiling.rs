//! Cost ceilings of a session: checked before a prompt is dispatched and on every `usage` event.
//!
//! Usage whose cost is known counts against the cost ceiling; once some usage had no price (the
//! session's total cost is unknown), the token ceiling applies instead, so a model without a price
//! cannot run unbounded.

use nightshift_protocol::http::UsageTotals;

/// Default cost ceiling of one session, in US dollars.
pub const DEFAULT_SESSION_COST_CEILING_USD: f64 = 25.0;
/// Default token ceiling of one session (input + output), for usage without a known price.
pub const DEFAULT_SESSION_TOKEN_CEILING: u64 = 5_000_000;

/// The ceilings in force for a session.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CostCeilings {
    /// Most a session may cost, in US dollars.
    pub session_cost_usd: f64,
    /// Most tokens (input + output) a session may use when its cost is unknown.
    pub session_tokens: u64,
}

impl Default for CostCeilings {
    fn default() -> Self {
        CostCeilings {
            session_cost_usd: DEFAULT_SESSION_COST_CEILING_USD,
            session_tokens: DEFAULT_SESSION_TOKEN_CEILING,
        }
    }
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
}
