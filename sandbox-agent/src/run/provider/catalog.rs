//! What we know per model: its context window and its price, from one table.
//!
//! An id matches an entry when it is the entry's id, or the id followed by a version suffix: a date
//! (`claude-sonnet-4-5-20250929`, `gpt-4o-2024-08-06`, Vertex's `claude-sonnet-4-5@20250929`) or
//! `-latest`; the longest matching id wins. So `o3-mini` is not priced as `o3`, nor
//! `claude-opus-4-7` as anything: unknown models have no price ([`cost_usd`] is `None`, never 0) and a
//! conservative window of 128k tokens.
//!
//! Prices are USD per million tokens. The token counts they apply to are [`TokenUsage`]'s, where
//! `input_tokens` excludes cache reads and writes for every provider. That is Anthropic's own meaning;
//! OpenAI's `prompt_tokens` *includes* the cached tokens, so the OpenAI stream reader splits them out,
//! and an OpenAI call costs `(prompt − cached) × input + cached × cache_read + completion × output`.
//! Anthropic bills cache writes at 1.25× and cache reads at 0.1× the input price; OpenAI has no cache
//! writes (the count is always 0; the table repeats the input price).

use super::TokenUsage;

/// Window of models not in the table.
pub const DEFAULT_CONTEXT_WINDOW_TOKENS: u64 = 128_000;
/// The scripted demo model: free, and as roomy as Claude.
const SCRIPTED_PREFIX: &str = "nightshift-scripted";
const SCRIPTED_CONTEXT_WINDOW_TOKENS: u64 = 200_000;

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// Uncached input.
    pub input_per_mtok: f64,
    /// Output.
    pub output_per_mtok: f64,
    /// Input written to the cache.
    pub cache_write_per_mtok: f64,
    /// Input read from the cache.
    pub cache_read_per_mtok: f64,
}

impl Price {
    /// Anthropic's shape: cache writes 1.25×, cache reads 0.1× the input price.
    const fn anthropic(input_per_mtok: f64, output_per_mtok: f64) -> Self {
        Self {
            input_per_mtok,
            output_per_mtok,
            cache_write_per_mtok: input_per_mtok * 1.25,
            cache_read_per_mtok: input_per_mtok * 0.1,
        }
    }

    /// OpenAI's shape: cached input at its own price, no cache writes.
    const fn openai(input_per_mtok: f64, output_per_mtok: f64, cached_per_mtok: f64) -> Self {
        Self {
            input_per_mtok,
            output_per_mtok,
            cache_write_per_mtok: input_per_mtok,
            cache_read_per_mtok: cached_per_mtok,
        }
    }

    /// The cost of `usage` in USD.
    pub fn cost_usd(&self, usage: &TokenUsage) -> f64 {
        let per_token = |count: u64, per_mtok: f64| count as f64 * per_mtok / 1_000_000.0;
        per_token(usage.input_tokens, self.input_per_mtok)
            + per_token(usage.output_tokens, self.output_per_mtok)
            + per_token(usage.cache_write_tokens, self.cache_write_per_mtok)
            + per_token(usage.cache_read_tokens, self.cache_read_per_mtok)
    }
}

/// What we know about a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelInfo {
    /// Most tokens of input plus output.
    pub context_window_tokens: u64,
    /// `None`: unknown (or free, for the scripted model).
    pub price: Option<Price>,
}

struct Entry {
    id: &'static str,
    context_window_tokens: u64,
    price: Price,
}

const CLAUDE_WINDOW: u64 = 200_000;

/// The table. Sources: the vendors' pricing and model pages.
const MODELS: &[Entry] = &[
    Entry {
        id: "claude-opus-4-1",
        context_window_tokens: CLAUDE_WINDOW,
        price: Price::anthropic(15.0, 75.0),
    },
    Entry {
        id: "claude-opus-4-5",
        context_window_tokens: CLAUDE_WINDOW,
        price: Price::anthropic(5.0, 25.0),
    },
    Entry {
        id: "claude-sonnet-4-5",
        context_window_tokens: CLAUDE_WINDOW,
        price: Price::anthropic(3.0, 15.0),
    },
    Entry {
        id: "claude-sonnet-4",
        context_window_tokens: CLAUDE_WINDOW,
        price: Price::anthropic(3.0, 15.0),
    },
    Entry {
        id: "claude-haiku-4-5",
        context_window_tokens: CLAUDE_WINDOW,
        price: Price::anthropic(1.0, 5.0),
    },
    Entry {
        id: "claude-3-5-haiku",
        context_window_tokens: CLAUDE_WINDOW,
        price: Price::anthropic(0.8, 4.0),
    },
    Entry {
        id: "gpt-4o",
        context_window_tokens: 128_000,
        price: Price::openai(2.5, 10.0, 1.25),
    },
    Entry {
        id: "gpt-4o-mini",
        context_window_tokens: 128_000,
        price: Price::openai(0.15, 0.6, 0.075),
    },
    Entry {
        id: "gpt-4.1",
        context_window_tokens: 1_047_576,
        price: Price::openai(2.0, 8.0, 0.5),
    },
    Entry {
        id: "gpt-4.1-mini",
        context_window_tokens: 1_047_576,
        price: Price::openai(0.4, 1.6, 0.1),
    },
    Entry {
        id: "o3",
        context_window_tokens: 200_000,
        price: Price::openai(2.0, 8.0, 0.5),
    },
    Entry {
        id: "o4-mini",
        context_window_tokens: 200_000,
        price: Price::openai(1.1, 4.4, 0.275),
    },
];

/// `-20250929`, `-2024-08-06`, `@20250929`.
fn is_date_suffix(rest: &str) -> bool {
    let Some(date) = rest.strip_prefix('-').or_else(|| rest.strip_prefix('@')) else {
        return false;
    };
    let digits = |text: &str, count: usize| {
        text.len() == count && text.bytes().all(|byte| byte.is_ascii_digit())
    };
    match date.split('-').collect::<Vec<_>>().as_slice() {
        [compact] => digits(compact, 8),
        [year, month, day] => digits(year, 4) && digits(month, 2) && digits(day, 2),
        _ => false,
    }
}

fn matches(model: &str, id: &str) -> bool {
    model
        .strip_prefix(id)
        .is_some_and(|rest| rest.is_empty() || rest == "-latest" || is_date_suffix(rest))
}

/// Window and price of `model`.
pub fn model_info(model: &str) -> ModelInfo {
    if model.starts_with(SCRIPTED_PREFIX) {
        return ModelInfo {
            context_window_tokens: SCRIPTED_CONTEXT_WINDOW_TOKENS,
            price: None,
        };
    }
    MODELS
        .iter()
        .filter(|entry| matches(model, entry.id))
        .max_by_key(|entry| entry.id.len())
        .map_or(
            ModelInfo {
                context_window_tokens: DEFAULT_CONTEXT_WINDOW_TOKENS,
                price: None,
            },
            |entry| ModelInfo {
                context_window_tokens: entry.context_window_tokens,
                price: Some(entry.price),
            },
        )
}

/// What `usage` of `model` cost in USD; `None` when the price is unknown.
pub fn cost_usd(model: &str, usage: &TokenUsage) -> Option<f64> {
    model_info(model).price.map(|price| price.cost_usd(usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price_of(model: &str) -> Option<(f64, f64, f64, f64)> {
        model_info(model).price.map(|p| {
            (
                p.input_per_mtok,
                p.output_per_mtok,
                p.cache_write_per_mtok,
                p.cache_read_per_mtok,
            )
        })
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn claude_prices_and_dated_ids() {
        let cases = [
            ("claude-opus-4-1", (15.0, 75.0, 18.75, 1.5)),
            ("claude-opus-4-1-20250805", (15.0, 75.0, 18.75, 1.5)),
            ("claude-opus-4-5", (5.0, 25.0, 6.25, 0.5)),
            ("claude-sonnet-4-5-20250929", (3.0, 15.0, 3.75, 0.3)),
            ("claude-sonnet-4-5@20250929", (3.0, 15.0, 3.75, 0.3)),
            ("claude-sonnet-4-20250514", (3.0, 15.0, 3.75, 0.3)),
            ("claude-haiku-4-5", (1.0, 5.0, 1.25, 0.1)),
            ("claude-3-5-haiku-latest", (0.8, 4.0, 1.0, 0.08)),
            ("claude-3-5-haiku-20241022", (0.8, 4.0, 1.0, 0.08)),
        ];
        for (model, (input, output, write, read)) in cases {
            let (i, o, w, r) = price_of(model).unwrap_or_else(|| panic!("{model}"));
            assert!(
                close(i, input) && close(o, output) && close(w, write) && close(r, read),
                "{model}: {:?}",
                (i, o, w, r)
            );
            assert_eq!(model_info(model).context_window_tokens, 200_000, "{model}");
        }
    }

    #[test]
    fn openai_prices_windows_and_longest_match() {
        let cases = [
            ("gpt-4o", 2.5, 10.0, 1.25, 128_000),
            ("gpt-4o-2024-08-06", 2.5, 10.0, 1.25, 128_000),
            ("gpt-4o-mini", 0.15, 0.6, 0.075, 128_000),
            ("gpt-4o-mini-2024-07-18", 0.15, 0.6, 0.075, 128_000),
            ("gpt-4.1", 2.0, 8.0, 0.5, 1_047_576),
            ("gpt-4.1-mini-2025-04-14", 0.4, 1.6, 0.1, 1_047_576),
            ("o3", 2.0, 8.0, 0.5, 200_000),
            ("o3-2025-04-16", 2.0, 8.0, 0.5, 200_000),
            ("o4-mini", 1.1, 4.4, 0.275, 200_000),
        ];
        for (model, input, output, cached, window) in cases {
            let info = model_info(model);
            let price = info.price.unwrap_or_else(|| panic!("{model}"));
            assert!(close(price.input_per_mtok, input), "{model}");
            assert!(close(price.output_per_mtok, output), "{model}");
            assert!(close(price.cache_read_per_mtok, cached), "{model}");
            assert_eq!(info.context_window_tokens, window, "{model}");
        }
    }

    #[test]
    fn unknown_and_scripted_models_have_no_price() {
        for model in [
            "claude-opus-4-7",
            "claude-sonnet-4-5-foo",
            "o3-mini",
            "o3-pro",
            "gpt-4o-realtime-preview",
            "llama3.1:8b",
            "",
        ] {
            assert_eq!(
                model_info(model),
                ModelInfo {
                    context_window_tokens: 128_000,
                    price: None
                },
                "{model}"
            );
            assert_eq!(cost_usd(model, &TokenUsage::default()), None, "{model}");
        }
        for model in ["nightshift-scripted-demo", "nightshift-scripted-1"] {
            assert_eq!(
                model_info(model),
                ModelInfo {
                    context_window_tokens: 200_000,
                    price: None
                }
            );
        }
    }

    #[test]
    fn cost_counts_every_kind_of_token() {
        let usage = TokenUsage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
            cache_read_tokens: 2_000_000,
            cache_write_tokens: 400_000,
        };
        // 3 + 1.5 + 0.6 (2M reads at 0.30) + 1.5 (400k writes at 3.75)
        let cost = cost_usd("claude-sonnet-4-5", &usage).unwrap();
        assert!(close(cost, 6.6), "{cost}");
        // OpenAI, as the stream reader normalizes it: prompt 2006 with 1920 cached → input 86.
        let usage = TokenUsage {
            input_tokens: 86,
            output_tokens: 300,
            cache_read_tokens: 1920,
            cache_write_tokens: 0,
        };
        let cost = cost_usd("gpt-4o", &usage).unwrap();
        let expected = (86.0 * 2.5 + 1920.0 * 1.25 + 300.0 * 10.0) / 1e6;
        assert!(close(cost, expected), "{cost} vs {expected}");
    }
}
