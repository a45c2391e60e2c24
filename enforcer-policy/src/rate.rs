//! Connection-rate limits: the inventory's `rate_limit` on an endpoint, and the kernel's
//! `RATE_LIMITS` table compiled from it.
//!
//! ```yaml
//! endpoints:
//!   - name: acme-vectors
//!     kind: vector_db
//!     rate_limit:
//!       connections_per_second: 20   # at risk 0 (a decimal > 0: 0.5 is one every 2 s)
//!       burst: 20                    # optional; default: connections_per_second, rounded up
//!       risk_halving: 0.25           # optional; every 0.25 of risk halves rate and burst
//! ```
//!
//! Each subject that the policy lets reach the endpoint gets its own budget, scaled by its
//! current risk `r` (the workload's `risk` attribute, or the override of `enforcer risk set`):
//! `rate = connections_per_second * 2^(-r / risk_halving)` and
//! `burst = max(1, floor(burst * 2^(-r / risk_halving)))`; a negative risk counts as 0 (a limit
//! never loosens below risk 0), and without `risk_halving` risk does not change the limit.
//! The kernel enforces it with a GCRA token bucket (`enforcer_common::rate`): over `t` seconds
//! of continuous attempts a subject opens `rate * t + burst` connections.

use std::collections::BTreeMap;

use enforcer_common::rate::{RateKey, RateLimit, MAX_BURST, MAX_INTERVAL_NS, NS_PER_SECOND};

use crate::inventory::{Inventory, Loc};
use crate::Compiled;

/// Scale of the decimals below (the Cedar decimal scale: 4 fractional digits).
const DECIMAL_SCALE: f64 = 10_000.0;

/// The smallest `connections_per_second` the inventory accepts, scaled by 10^4: 0.001, one
/// connection per 1000 s (risk may shrink it further, down to one per hour).
pub const MIN_PER_SECOND_E4: i64 = 10;
/// The largest, scaled by 10^4: one million per second.
pub const MAX_PER_SECOND_E4: i64 = 1_000_000 * 10_000;

/// An endpoint's `rate_limit`, as written (decimals scaled by 10^4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitSpec {
    /// Connections per second at risk 0, scaled by 10^4 (`MIN_PER_SECOND_E4` to
    /// `MAX_PER_SECOND_E4`).
    pub per_second_e4: i64,
    /// Connections allowed at once at risk 0 (1 to `MAX_BURST`).
    pub burst: u64,
    /// The risk increase that halves rate and burst, scaled by 10^4 (> 0); `None`: risk does
    /// not change the limit.
    pub risk_halving_e4: Option<i64>,
    /// Location of the `rate_limit` key's value.
    pub loc: Loc,
}

impl RateLimitSpec {
    /// The factor risk `risk_e4` (scaled by 10^4) applies: `2^(-max(risk, 0) / halving)`, in
    /// (0, 1].
    fn factor(&self, risk_e4: i64) -> f64 {
        match self.risk_halving_e4 {
            Some(halving) if risk_e4 > 0 => (-(risk_e4 as f64) / halving as f64).exp2(),
            _ => 1.0,
        }
    }

    /// Connections per second at risk `risk_e4`.
    pub fn per_second_at(&self, risk_e4: i64) -> f64 {
        self.per_second_e4 as f64 / DECIMAL_SCALE * self.factor(risk_e4)
    }

    /// Burst at risk `risk_e4`: at least 1.
    pub fn burst_at(&self, risk_e4: i64) -> u64 {
        ((self.burst as f64 * self.factor(risk_e4)).floor() as u64).max(1)
    }

    /// The kernel's limit at risk `risk_e4` (a Cedar decimal scaled by 10^4): the emission
    /// interval rounded up to whole nanoseconds (never faster than the rate), at most one
    /// connection per hour.
    pub fn at_risk(&self, risk_e4: i64) -> RateLimit {
        let interval = (NS_PER_SECOND as f64 / self.per_second_at(risk_e4)).ceil();
        let interval_ns = if interval.is_finite() && interval < MAX_INTERVAL_NS as f64 {
            interval as u64
        } else {
            MAX_INTERVAL_NS
        };
        RateLimit::from_interval(interval_ns, self.burst_at(risk_e4).min(MAX_BURST))
    }
}

/// The `RATE_LIMITS` table of a compiled policy: for every endpoint with a `rate_limit` and
/// every local subject the table allows to reach it (any cell), the limit at the subject's risk
/// in `compiled` (which carries `enforcer risk set` overrides). Keyed by identities, as the
/// kernel looks it up.
pub fn rate_limits(inventory: &Inventory, compiled: &Compiled) -> BTreeMap<RateKey, RateLimit> {
    let limited: BTreeMap<u32, &RateLimitSpec> = inventory
        .endpoints
        .iter()
        .filter_map(|e| {
            let spec = e.rate_limit.as_ref()?;
            Some((compiled.identity_by_name(&e.name)?.id, spec))
        })
        .collect();
    let mut out = BTreeMap::new();
    if limited.is_empty() {
        return out;
    }
    for (key, value) in compiled.allows() {
        let Some(spec) = limited.get(&key.destination) else {
            continue;
        };
        if !value.is_allow() {
            continue;
        }
        let Some(subject) = compiled.identity(key.subject).filter(|i| i.is_subject()) else {
            continue;
        };
        // The compile validated every risk; an unreadable one would be refused earlier.
        let risk = crate::risk::parse_decimal(&subject.risk).unwrap_or(0);
        out.insert(
            RateKey {
                subject: key.subject,
                destination: key.destination,
            },
            spec.at_risk(risk),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(per_second: f64, burst: u64, halving: Option<f64>) -> RateLimitSpec {
        RateLimitSpec {
            per_second_e4: (per_second * DECIMAL_SCALE) as i64,
            burst,
            risk_halving_e4: halving.map(|h| (h * DECIMAL_SCALE) as i64),
            loc: Loc::default(),
        }
    }

    #[test]
    fn risk_halves_rate_and_burst_per_step() {
        let s = spec(20.0, 20, Some(0.25));
        let at0 = s.at_risk(0);
        assert_eq!(at0.interval_ns, 50_000_000);
        assert_eq!(at0.burst(), 20);
        let at_half = s.at_risk(5_000); // risk 0.5: two halvings
        assert_eq!(at_half.interval_ns, 200_000_000);
        assert_eq!(at_half.burst(), 5);
        // Negative risk never loosens; no `risk_halving`: risk does not count.
        assert_eq!(s.at_risk(-10_000), at0);
        assert_eq!(spec(20.0, 20, None).at_risk(9_000), at0);
    }

    #[test]
    fn extreme_limits_stay_in_the_kernel_bounds() {
        // Huge risk: one connection per hour, burst 1.
        let s = spec(0.001, 1, Some(0.0001));
        let l = s.at_risk(1_000_000_000);
        assert_eq!((l.interval_ns, l.burst()), (MAX_INTERVAL_NS, 1));
        // Fractional rate rounds the interval up: 3 per second is 333,333,334 ns.
        assert_eq!(spec(3.0, 1, None).at_risk(0).interval_ns, 333_333_334);
        let fast = spec(1_000_000.0, MAX_BURST, None).at_risk(0);
        assert_eq!((fast.interval_ns, fast.burst()), (1_000, MAX_BURST));
    }
}
