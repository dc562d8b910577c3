//! What the comparison benches share besides their processes (included with `#[path]`):
//! knobs, the load generator's client threads and rounds, statistics, number formatting.

/// Runs `client(t)` for `t` in `0..n`, each on a thread of its own, and returns what they
/// returned, in order.
#[allow(dead_code)] // not every bench runs its clients on threads
pub fn on_threads<R: Send>(n: usize, client: impl Fn(usize) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|t| {
                let client = &client;
                s.spawn(move || client(t))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    })
}

/// `targets` in the order of round `round`: reversed every other round, so that no target
/// always runs right after the same one.
pub fn round_order<T: Copy>(targets: &[T], round: usize) -> Vec<T> {
    let mut order = targets.to_vec();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// The cores this process may run on (0 when unknown), for the report's first line.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

/// The `p` quantile (0..=1) of the latencies `sorted` (NaN when empty).
#[allow(dead_code)] // the load bench takes its percentiles from wrk and h2load
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// One target's figures, a value per round (medians are taken over them).
#[allow(dead_code)] // the load bench keeps figures of its own
#[derive(Default)]
pub struct Samples {
    /// Operations per second.
    pub rate: Vec<f64>,
    /// Latency percentiles, µs.
    pub p50: Vec<f64>,
    pub p99: Vec<f64>,
    /// The proxy's CPU µs per operation (rounds with none measured add nothing).
    pub cpu_us: Vec<f64>,
    /// Failed operations (errors, losses), all rounds together.
    pub failed: u64,
}

#[allow(dead_code)]
impl Samples {
    /// Records one round: its `rate`, its latencies `sorted_us`, its `failed` operations and
    /// the proxy's CPU µs per operation when measured.
    pub fn record(&mut self, rate: f64, sorted_us: &[u32], failed: u64, cpu_us: Option<f64>) {
        self.rate.push(rate);
        self.p50.push(percentile(sorted_us, 0.50));
        self.p99.push(percentile(sorted_us, 0.99));
        self.failed += failed;
        self.cpu_us.extend(cpu_us);
    }
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Microseconds as "850 µs" or "2.31 ms" ("-" for NaN).
/// A CPU time in µs with one decimal, "-" when unmeasured.
pub fn fmt_cpu_us(us: f64) -> String {
    if us.is_nan() {
        "-".into()
    } else {
        format!("{us:.1}")
    }
}

pub fn fmt_us(us: f64) -> String {
    if us.is_nan() {
        "-".into()
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// `a / b` as "1.23×" ("-" when undefined).
pub fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "-".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

/// An environment knob: `default` when unset; a value that does not parse is an error.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// A comma-separated list knob of thread counts, e.g. `1,2`.
pub fn env_threads(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|t| {
            t.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: numbers like 1,2"))
        })
        .collect()
}
