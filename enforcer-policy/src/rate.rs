//! Connection-rate limits: the inventory's `rate_limit` on an endpoint (or the
//! `ai-enforcer.io/rate-limit` annotation of a pod, the same fields), and the kernel's
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
//!
//! A pod says the same in one annotation, `key=value` pairs separated by commas:
//! `ai-enforcer.io/rate-limit: "connections_per_second=20, burst=20, risk_halving=0.25"`. A
//! Service is limited as its backends: each subject's calls through its address get the
//! strictest limit of its ready backends, in a bucket of their own.

use std::collections::{BTreeMap, BTreeSet};

use enforcer_common::rate::{RateKey, RateLimit, MAX_BURST, MAX_INTERVAL_NS, NS_PER_SECOND};

use crate::inventory::Loc;
use crate::Compiled;

/// Scale of the decimals below (the Cedar decimal scale: 4 fractional digits).
const DECIMAL_SCALE: f64 = 10_000.0;

/// The smallest `connections_per_second` the inventory accepts, scaled by 10^4: 0.001, one
/// connection per 1000 s (risk may shrink it further, down to one per hour).
pub const MIN_PER_SECOND_E4: i64 = 10;
/// The largest, scaled by 10^4: one million per second.
pub const MAX_PER_SECOND_E4: i64 = 1_000_000 * 10_000;

/// The fields of a `rate_limit`, as the inventory and the annotation name them.
pub const FIELDS: [&str; 3] = ["connections_per_second", "burst", "risk_halving"];

/// Whether `value` (scaled as [`parse_field`] returns it) is in the range of field `key`.
fn in_range(key: &str, value: i64) -> bool {
    match key {
        "connections_per_second" => (MIN_PER_SECOND_E4..=MAX_PER_SECOND_E4).contains(&value),
        "burst" => (1..=MAX_BURST as i64).contains(&value),
        "risk_halving" => value > 0,
        _ => false,
    }
}

/// One field's value, checked: connections per second and risk halving scaled by 10^4, the
/// burst as written. Errors: (what is wrong, what is expected).
pub fn parse_field(key: &str, text: &str) -> Result<i64, (String, String)> {
    let (parsed, hint) = match key {
        "connections_per_second" => (
            crate::risk::parse_decimal(text).ok(),
            "a decimal from 0.001 to 1000000 (connections per second at risk 0), e.g. 20 or 0.5"
                .to_string(),
        ),
        "burst" => (
            text.parse::<i64>().ok(),
            format!("a whole number of connections from 1 to {MAX_BURST}"),
        ),
        "risk_halving" => (
            crate::risk::parse_decimal(text).ok(),
            "a positive decimal: the risk increase that halves rate and burst, e.g. 0.25"
                .to_string(),
        ),
        _ => {
            return Err((
                format!("unknown field `{key}`"),
                format!("the fields are {}", FIELDS.join(", ")),
            ))
        }
    };
    match parsed {
        Some(n) if in_range(key, n) => Ok(n),
        _ => Err((format!("invalid {key} `{text}`"), hint)),
    }
}

/// The longest `ai-enforcer.io/rate-limit` annotation read (the longest sensible one is
/// under 100 bytes); a longer one is refused unread.
pub const MAX_ANNOTATION_BYTES: usize = 256;

/// The most problems of one annotation named in its error; the rest are counted.
const MAX_PROBLEMS: usize = 3;

/// A pod's `ai-enforcer.io/rate-limit` annotation: `key=value` pairs of [`FIELDS`] separated
/// by commas (spaces around them ignored), `connections_per_second` required. The error names
/// the first [`MAX_PROBLEMS`] problems, `;`-separated, and counts the others: a tenant writes
/// the text, and every node's agent keeps the error, so it stays short whatever the text.
pub fn parse_annotation(text: &str) -> Result<RateLimitSpec, String> {
    if text.len() > MAX_ANNOTATION_BYTES {
        return Err(format!(
            "{} bytes, more than {MAX_ANNOTATION_BYTES}",
            text.len()
        ));
    }
    // Quoted in the error, a line break would split the line it is logged on.
    if text.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    let mut values: [Option<i64>; 3] = [None; 3];
    let mut problems = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            problems.push(format!("`{pair}` is not key=value"));
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match (
            FIELDS.iter().position(|f| *f == key),
            parse_field(key, value),
        ) {
            (Some(i), Ok(_)) if values[i].is_some() => problems.push(format!("{key} given twice")),
            (Some(i), Ok(n)) => values[i] = Some(n),
            (_, Err((what, hint))) => problems.push(format!("{what} ({hint})")),
            (None, Ok(_)) => unreachable!("parse_field refuses unknown keys"),
        }
    }
    if values[0].is_none() {
        problems.push("missing connections_per_second".into());
    }
    if problems.len() > MAX_PROBLEMS {
        let more = problems.len() - MAX_PROBLEMS;
        problems.truncate(MAX_PROBLEMS);
        problems.push(format!("and {more} more"));
    }
    match values {
        [Some(per_second_e4), burst, halving] if problems.is_empty() => {
            Ok(RateLimitSpec::from_fields(
                per_second_e4,
                burst.map(|b| b as u64),
                halving,
                Loc::default(),
            ))
        }
        _ => Err(problems.join("; ")),
    }
}

/// An endpoint's `rate_limit`, as written (decimals scaled by 10^4).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimitSpec {
    /// Connections per second at risk 0, scaled by 10^4 (`MIN_PER_SECOND_E4` to
    /// `MAX_PER_SECOND_E4`).
    pub per_second_e4: i64,
    /// Connections allowed at once at risk 0 (1 to `MAX_BURST`).
    pub burst: u64,
    /// The risk increase that halves rate and burst, scaled by 10^4 (> 0); `None`: risk does
    /// not change the limit.
    pub risk_halving_e4: Option<i64>,
    /// Location of the `rate_limit` key's value (none for an annotation's).
    #[serde(skip)]
    pub loc: Loc,
}

impl RateLimitSpec {
    /// A limit from checked fields ([`parse_field`]); the burst defaults to one second's
    /// worth, at least 1.
    pub fn from_fields(
        per_second_e4: i64,
        burst: Option<u64>,
        risk_halving_e4: Option<i64>,
        loc: Loc,
    ) -> Self {
        let burst = burst.unwrap_or_else(|| ((per_second_e4 + 9_999) / 10_000).max(1) as u64);
        Self {
            per_second_e4,
            burst: burst.min(MAX_BURST),
            risk_halving_e4,
            loc,
        }
    }

    /// The annotation text that gives this limit, every field written out (decimals with
    /// their 4 fractional digits): the identity label of a rate-limited pod.
    pub fn canonical(&self) -> String {
        let decimal = |e4: i64| format!("{}.{:04}", e4 / 10_000, e4 % 10_000);
        let mut text = format!(
            "connections_per_second={},burst={}",
            decimal(self.per_second_e4),
            self.burst
        );
        if let Some(halving) = self.risk_halving_e4 {
            text.push_str(&format!(",risk_halving={}", decimal(halving)));
        }
        text
    }

    /// Checks a limit that did not come through [`parse_field`] (a persisted cluster state):
    /// the first field out of its range.
    pub fn check(&self) -> Result<(), String> {
        let fields = [
            ("connections_per_second", Some(self.per_second_e4)),
            ("burst", i64::try_from(self.burst).ok().or(Some(0))),
            ("risk_halving", self.risk_halving_e4),
        ];
        match fields
            .into_iter()
            .find(|(key, value)| value.is_some_and(|v| !in_range(key, v)))
        {
            Some((key, _)) => Err(format!("rate limit: {key} out of range")),
            None => Ok(()),
        }
    }

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

/// The `RATE_LIMITS` table of a compiled policy: for every destination with a rate limit
/// (an inventory endpoint's `rate_limit`, a pod's annotation, a Service's strictest ready
/// backend's) and every local subject the table allows to reach it (any cell), the limit at
/// the subject's risk in `compiled` (which carries `enforcer risk set` overrides). Keyed by
/// identities, as the kernel looks it up.
pub fn rate_limits(compiled: &Compiled) -> BTreeMap<RateKey, RateLimit> {
    let mut limited: BTreeMap<u32, Vec<&RateLimitSpec>> = BTreeMap::new();
    for identity in compiled.identities() {
        if let Some(spec) = &identity.rate_limit {
            limited.entry(identity.id).or_default().push(spec);
        }
    }
    let services: Vec<(u32, Vec<&RateLimitSpec>)> = compiled
        .identities()
        .filter(|i| !i.service_ports.is_empty())
        .filter_map(|service| {
            let specs: Vec<&RateLimitSpec> = service
                .service_ports
                .iter()
                .flat_map(|p| &p.backends)
                .filter_map(|b| compiled.backend_identity(&b.ip).rate_limit.as_ref())
                .collect();
            (!specs.is_empty()).then_some((service.id, specs))
        })
        .collect();
    limited.extend(services);
    let mut out = BTreeMap::new();
    if limited.is_empty() {
        return out;
    }
    for (key, value) in compiled.allows() {
        let Some(specs) = limited.get(&key.destination) else {
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
        let limit = specs
            .iter()
            .map(|spec| spec.at_risk(risk))
            .reduce(|a, b| stricter(&a, &b))
            .expect("a limited destination has a limit");
        out.insert(RateKey::own(key.subject, key.destination), limit);
    }
    out
}

/// A `RATE_LIMITS` table cut to the room the map has ([`fit`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fitted {
    /// What to write: the pairs kept, and the shared entries ([`RateKey::shared`], and
    /// [`RateKey::across_tenants`] for the destinations the tenants' own would not fit).
    pub limits: BTreeMap<RateKey, RateLimit>,
    /// Per tenant of a subject (its name; `""` for none) whose pairs did not all fit: (its
    /// pairs, those kept). Empty when everything fits.
    pub shared: BTreeMap<String, (usize, usize)>,
}

/// One tenant's limited pairs, in the order they are kept: first those to a destination of
/// another tenant (a limit the subject's tenant did not set, e.g. an operator's endpoint),
/// then by key.
struct Demand {
    tenant: u32,
    name: String,
    /// How many pairs the tenant had before any went to an entry shared across tenants.
    total: usize,
    pairs: Vec<(RateKey, RateLimit)>,
    /// `beyond[k]`: the tenant's shared entries needed when its first `k` pairs are kept (the
    /// destinations of the rest). `k + beyond[k]` never falls as `k` grows (a pair kept costs
    /// one entry and saves at most one), so `beyond[0]`, its destinations, is the least the
    /// tenant can be held to.
    beyond: Vec<usize>,
}

impl Demand {
    fn new(tenant: u32, name: String, total: usize, pairs: Vec<(RateKey, RateLimit)>) -> Self {
        let mut beyond = vec![0; pairs.len() + 1];
        let mut seen = BTreeSet::new();
        for k in (0..pairs.len()).rev() {
            seen.insert(pairs[k].0.destination);
            beyond[k] = seen.len();
        }
        Self {
            tenant,
            name,
            total,
            pairs,
            beyond,
        }
    }
}

/// Cuts `pairs` (of [`rate_limits`]) to `room` entries, so that one tenant's many label sets
/// or limited destinations cannot fill the map and have the node's whole policy refused
/// (red-team review 39 H3). When everything fits, nothing changes. Otherwise every pair that
/// does not keep an entry of its own is held to its tenant's shared entry for its
/// destination ([`RateKey::shared`]): the strictest limit of that tenant's pairs it stands
/// for, in one bucket, so a pair that did not fit is held tighter, never let loose, and only
/// beside pairs of its own tenant (red-team review 43 M1: one shared bucket per destination
/// let one tenant's flood, or one subject's risk, draw another tenant's pairs down).
///
/// The room is cut so: each tenant of a subject is first given the least it can be held to
/// (one shared entry per destination its pairs reach), then the rest max-min fairly (the
/// tenants in order of what more they ask, each at most an equal part of what is left,
/// rounded up), and keeps as many of its pairs, in [`Demand`] order, as leave room for the
/// shared entries of the others. Should the tenants' least alone exceed `room`, the
/// destinations most tenants reach, and only as many as that takes, have one entry shared by
/// every tenant instead ([`RateKey::across_tenants`], the fit before review 43, which the
/// kernel looks up after the tenant's). The result never exceeds `room` (red-team review 47:
/// the first per-tenant cut made the table outgrow the map, and the node's policy was
/// refused) unless each destination is reached by one tenant and they still outnumber it:
/// then every pair is shared and all are written, up to the map's own check of old and new
/// together (`RateWriter::check_fits`), which refuses the change only past the whole map.
pub fn fit(compiled: &Compiled, pairs: BTreeMap<RateKey, RateLimit>, room: usize) -> Fitted {
    if pairs.len() <= room {
        return Fitted {
            limits: pairs,
            shared: BTreeMap::new(),
        };
    }
    let mut demands = demands(compiled, pairs);
    let mut out = Fitted::default();
    let merged = across_tenants(&demands, room);
    if !merged.is_empty() {
        let mut held: BTreeMap<u32, RateLimit> = BTreeMap::new();
        for demand in &mut demands {
            let (across, own): (Vec<_>, Vec<_>) = std::mem::take(&mut demand.pairs)
                .into_iter()
                .partition(|(key, _)| merged.contains(&key.destination));
            for (key, limit) in across {
                held.entry(key.destination)
                    .and_modify(|h| *h = stricter(h, &limit))
                    .or_insert(limit);
            }
            *demand = Demand::new(
                demand.tenant,
                std::mem::take(&mut demand.name),
                demand.total,
                own,
            );
        }
        for (destination, limit) in held {
            out.limits
                .insert(RateKey::across_tenants(destination), limit);
        }
    }
    let room = room.saturating_sub(merged.len());
    let least: usize = demands.iter().map(|d| d.beyond[0]).sum();
    demands.sort_by_key(|d| d.pairs.len() - d.beyond[0]);
    let tenants = demands.len();
    let mut left = room.saturating_sub(least);
    for (i, demand) in demands.into_iter().enumerate() {
        // Rounded up: a tenant asking little is not left with nothing by the division (and
        // never more than is left: ceil(left / n) <= left).
        let given = (demand.pairs.len() - demand.beyond[0]).min(left.div_ceil(tenants - i));
        left -= given;
        let allotted = demand.beyond[0] + given;
        let kept = (0..=demand.pairs.len())
            .rev()
            .find(|&k| k + demand.beyond[k] <= allotted)
            .expect("keeping none fits: the least is allotted");
        hold(demand, kept, &mut out);
    }
    out
}

/// The destinations whose pairs go to one entry shared by every tenant when the tenants'
/// least (one entry per destination each reaches) exceeds `room`: those most tenants reach
/// first (a destination `n` tenants reach saves `n - 1` entries), as few as bring the least
/// within `room`. None when it fits; those reached by two tenants or more at most.
fn across_tenants(demands: &[Demand], room: usize) -> BTreeSet<u32> {
    let least: usize = demands.iter().map(|d| d.beyond[0]).sum();
    let mut merged = BTreeSet::new();
    if least <= room {
        return merged;
    }
    let mut reached: BTreeMap<u32, usize> = BTreeMap::new();
    for demand in demands {
        let destinations: BTreeSet<u32> = demand.pairs.iter().map(|(k, _)| k.destination).collect();
        for destination in destinations {
            *reached.entry(destination).or_default() += 1;
        }
    }
    let mut by_reach: Vec<(usize, u32)> = reached.into_iter().map(|(d, n)| (n, d)).collect();
    by_reach.sort_by_key(|&(n, d)| (std::cmp::Reverse(n), d));
    let mut saved = 0;
    for (n, destination) in by_reach {
        if n < 2 || least - saved <= room {
            break;
        }
        merged.insert(destination);
        saved += n - 1;
    }
    merged
}

/// Each tenant's pairs (by tenant number, the one the kernel compares), in [`Demand`] order.
fn demands(compiled: &Compiled, pairs: BTreeMap<RateKey, RateLimit>) -> Vec<Demand> {
    let identity = |id: u32| compiled.identity(id);
    let tenant_id = |id: u32| identity(id).map_or(0, |i| i.tenant_id);
    let mut by_tenant: BTreeMap<u32, Vec<(RateKey, RateLimit)>> = BTreeMap::new();
    for (key, limit) in pairs {
        by_tenant
            .entry(tenant_id(key.subject))
            .or_default()
            .push((key, limit));
    }
    by_tenant
        .into_iter()
        .map(|(tenant, mut pairs)| {
            pairs.sort_by_key(|(key, _)| (tenant_id(key.destination) == tenant, *key));
            let name = pairs
                .first()
                .and_then(|(key, _)| identity(key.subject))
                .and_then(|i| i.tenant.clone())
                .unwrap_or_default();
            Demand::new(tenant, name, pairs.len(), pairs)
        })
        .collect()
}

/// Writes `demand`'s first `kept` pairs into `out` as they are, and holds the rest to its
/// tenant's shared entry for their destination, the strictest of theirs.
fn hold(demand: Demand, kept: usize, out: &mut Fitted) {
    if kept < demand.total {
        out.shared.insert(demand.name, (demand.total, kept));
    }
    let mut held: BTreeMap<u32, RateLimit> = BTreeMap::new();
    for (n, (key, limit)) in demand.pairs.into_iter().enumerate() {
        if n < kept {
            out.limits.insert(key, limit);
        } else {
            held.entry(key.destination)
                .and_modify(|h| *h = stricter(h, &limit))
                .or_insert(limit);
        }
    }
    for (destination, limit) in held {
        out.limits
            .insert(RateKey::shared(demand.tenant, destination), limit);
    }
}

/// The stricter of two limits, componentwise: the longer interval, the smaller burst.
pub fn stricter(a: &RateLimit, b: &RateLimit) -> RateLimit {
    RateLimit {
        interval_ns: a.interval_ns.max(b.interval_ns),
        tolerance_ns: a.tolerance_ns.min(b.tolerance_ns),
    }
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
    fn an_annotation_reads_like_the_inventory_and_names_every_bad_field() {
        let a = parse_annotation("connections_per_second=20, burst=30, risk_halving=0.25").unwrap();
        assert_eq!(a, spec(20.0, 30, Some(0.25)));
        // The burst defaults to one second's worth, as in the inventory.
        assert_eq!(
            parse_annotation("connections_per_second=2.5")
                .unwrap()
                .burst,
            3
        );
        // Written out in full, the text reads back as the same limit.
        for s in [
            a,
            spec(0.001, 1, None),
            spec(1_000_000.0, MAX_BURST, Some(0.0001)),
        ] {
            assert_eq!(
                parse_annotation(&s.canonical()).unwrap(),
                s,
                "{}",
                s.canonical()
            );
            assert!(s.check().is_ok());
        }
        let e = parse_annotation("burst=0, risk_halving=-1, nonsense").unwrap_err();
        for what in [
            "invalid burst `0`",
            "invalid risk_halving `-1`",
            "`nonsense` is not key=value",
            "and 1 more",
        ] {
            assert!(e.contains(what), "{what}: {e}");
        }
        let e = parse_annotation("x=1").unwrap_err();
        assert!(e.contains("unknown field `x`") && e.contains("missing connections_per_second"));
        // A tenant's text: long or hostile, the error stays short and on one line.
        let e = parse_annotation(&"=,".repeat(10_000)).unwrap_err();
        assert_eq!(e, "20000 bytes, more than 256");
        let e = parse_annotation(&"=,".repeat(128)).unwrap_err();
        assert!(e.len() < 300 && e.ends_with("and 126 more"), "{e}");
        assert!(parse_annotation("connections_per_second=1\nburst=1")
            .unwrap_err()
            .contains("control character"));
        assert!(
            parse_annotation("connections_per_second=1,connections_per_second=2")
                .unwrap_err()
                .contains("given twice")
        );
        // A persisted limit out of range is refused, as its text would be.
        let mut out = spec(20.0, 20, None);
        out.burst = 0;
        assert!(out.check().unwrap_err().contains("burst"));
        out.burst = 1;
        out.risk_halving_e4 = Some(0);
        assert!(out.check().unwrap_err().contains("risk_halving"));
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
