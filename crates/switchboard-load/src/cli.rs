//! The command line of `switchboard-load`: every flag with its default, the
//! checks clap cannot express (ranges, flag combinations, loopback-only
//! targets), and the resolved settings the rest of the loader reads.
//!
//! This module decides nothing about load; it only validates what was asked.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use switchboard_bench_schema::{PassRule, Protocol, Workload};

/// How connections are spread over the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Placement {
    /// Connection j of user k goes to target (k + j) mod N (user k -> k mod N).
    RoundRobin,
    /// Every connection goes to a target drawn from `--seed`.
    Random,
}

/// How the sender of each message is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SenderPick {
    /// A uniformly random connected user (connection) per message.
    Random,
    /// Round-robin over the connections, as the Socket.IO peer's load.js does.
    RoundRobin,
}

/// How the loader authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// `?user=NAME` (server started with `--auth none`).
    None,
    /// `?token=JWT` minted with `--jwt-secret` (HS256, `sub`, `exp`).
    Jwt,
}

/// Load generator for Switchboard: connects users over WebSocket, offers an
/// open-loop message rate and measures delivery and latency. Prints one JSON
/// summary (stdout or --out).
#[derive(Debug, Clone, Parser)]
#[command(name = "switchboard-load", version, long_about = None)]
pub struct Args {
    /// Instances to connect to, comma-separated (ws://HOST:PORT; the path
    /// /ws, or /socket.io/ with --protocol socketio, is added).
    #[arg(long, value_delimiter = ',', default_value = "ws://127.0.0.1:8081")]
    pub targets: Vec<String>,

    /// What the targets speak: `switchboard` (its JSON frames), or `socketio`
    /// (the Socket.IO peer of bench/peers/socketio: Engine.IO 4 / Socket.IO 5
    /// over WebSocket, the user in the connect packet's auth; no JWT, no
    /// connections workload).
    #[arg(long, value_enum, default_value = "switchboard")]
    pub protocol: Protocol,

    /// Accept targets outside 127.0.0.0/8, ::1 and localhost.
    #[arg(long)]
    pub allow_remote: bool,

    /// Number of users (names <prefix>0 .. <prefix>{U-1}).
    #[arg(long, default_value_t = 200)]
    pub users: u32,

    /// WebSocket connections per user.
    #[arg(long, default_value_t = 1)]
    pub conns_per_user: u32,

    /// Prefix of the user names.
    #[arg(long, default_value = "u")]
    pub user_prefix: String,

    /// Prefix of the room names.
    #[arg(long, default_value = "r")]
    pub room_prefix: String,

    /// How connections are spread over the targets.
    #[arg(long, value_enum, default_value = "round-robin")]
    pub placement: Placement,

    /// Seed of every random choice (placement, senders, recipients, churn).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Authentication: `none` (?user=) or `jwt` (?token=, needs --jwt-secret).
    /// Default: jwt when --jwt-secret is given, none otherwise.
    #[arg(long, value_enum)]
    pub auth: Option<AuthMode>,

    /// HS256 secret used to mint a token per user (implies --auth jwt).
    #[arg(long, env = "SWITCHBOARD_LOAD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Lifetime of minted tokens, seconds.
    #[arg(long, default_value_t = 3600)]
    pub jwt_ttl: u64,

    /// What to send.
    #[arg(long, value_enum, default_value = "dm")]
    pub workload: Workload,

    /// Offered messages per second, in total (open loop).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,

    /// Length of the send phase (of each step with --find-max), seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Serialized size of the JSON body (a string) in bytes.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,

    /// Share of DMs whose recipient is homed on the sender's instance.
    /// Default: recipient uniform over all other users.
    #[arg(long)]
    pub locality: Option<f64>,

    /// How the sender of each message is chosen.
    #[arg(long, value_enum, default_value = "random")]
    pub sender: SenderPick,

    /// Room workloads: number of rooms.
    #[arg(long, default_value_t = 10)]
    pub rooms: u32,

    /// Room workloads: members (users) per room; every connection of a member joins.
    #[arg(long, default_value_t = 10)]
    pub room_members: u32,

    /// Room workloads: over how many instances a room's members are homed (default: all).
    #[arg(long)]
    pub room_spread: Option<u32>,

    /// Mixed workload: share of messages that are room messages.
    #[arg(long, default_value_t = 0.5)]
    pub room_share: f64,

    /// Churn workload: users disconnected and reconnected per second.
    #[arg(long, default_value_t = 10.0)]
    pub churn_rate: f64,

    /// Send every dm/room frame with `"ack":false` (fire-and-forget, like the
    /// Socket.IO peer's clients): no acks are awaited; every sent message is
    /// expected to be delivered to every recipient / other member connection
    /// counted at step start. Not supported with `--workload churn`.
    #[arg(long)]
    pub no_ack: bool,

    /// `false`: send every DM with `"store":false` (protocol v1.1's
    /// ephemeral DM: not stored in the recipient's inbox, the ack has no
    /// `seq`). `true` (the default) sends no `store` field: the DM is stored.
    /// Room messages are never stored. Switchboard's protocol only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub dm_store: bool,

    /// After the send phase, wait at most this long for outstanding deliveries, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,

    /// Unrecorded send phase at the same rate before each measured run/step, seconds.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,

    /// Connect phase bound (all connections, welcome and room joins), seconds.
    #[arg(long, default_value_t = 20.0)]
    pub connect_timeout: f64,

    /// Connections opened at the same time during the connect phase.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,

    /// Raise the rate step by step until a step fails; report the highest passing rate.
    #[arg(long)]
    pub find_max: bool,

    /// --find-max: rate of the first step, messages/s.
    #[arg(long, default_value_t = 5000.0)]
    pub start_rate: f64,

    /// --find-max: factor between two steps.
    #[arg(long, default_value_t = 1.5)]
    pub step_factor: f64,

    /// --find-max: at most this many steps.
    #[arg(long, default_value_t = 20)]
    pub max_steps: u32,

    /// --find-max: run a failing rate again this many times before stopping
    /// (the Socket.IO peer's bench.js retries once).
    #[arg(long, default_value_t = 0)]
    pub retries: u32,

    /// Pause between steps so the server drains, seconds.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,

    /// Pass rule: p99 latency at most this, ms.
    #[arg(long, default_value_t = 100.0)]
    pub max_p99_ms: f64,

    /// Pass rule: delivered / expected at least this (and sent / offered too).
    #[arg(long, default_value_t = 0.99)]
    pub min_delivery: f64,

    /// Connections workload: bind each socket to one of these source
    /// addresses before connecting (connection i uses the i-th, round-robin),
    /// so more connections fit than one address's ephemeral ports allow
    /// (about 28,000 each). Loopback only unless --allow-remote. Default: the
    /// kernel's choice.
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<IpAddr>,

    /// Connections workload: a connection the server closes (or that fails)
    /// reconnects to one of these, comma-separated (connection i, attempt k
    /// goes to the (i + k)-th); without them a lost connection stays closed.
    #[arg(long, value_delimiter = ',')]
    pub reconnect_targets: Vec<String>,

    /// Connections workload: a reconnect within this of the loss counts as in time, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub reconnect_within: f64,

    /// Connections workload: a lost connection stops trying to reconnect this
    /// long after the loss, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub reconnect_timeout: f64,

    /// Connections workload: hold this long after the connect phase, then
    /// close, seconds. Default: until SIGTERM or SIGINT, or until no
    /// connection is left open.
    #[arg(long)]
    pub hold: Option<f64>,

    /// Presence workload: watcher connections (user names
    /// <watcher-prefix>0 ..), spread round-robin over --watcher-instances.
    #[arg(long, default_value_t = 20)]
    pub watcher_conns: u32,

    /// Presence workload: watcher connections per churning user (0: the
    /// watchers connect but watch nobody, a control run).
    #[arg(long, default_value_t = 10)]
    pub watchers_per_user: u32,

    /// Presence workload: the targets (0-based indices in --targets) the
    /// watcher connections are on; the churning users connect to every
    /// target. Users k with k mod (W+1) = i < W are watched from the i-th
    /// of these W instances only, the others from two of them.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    pub watcher_instances: Vec<usize>,

    /// Presence workload: prefix of the watchers' user names.
    #[arg(long, default_value = "w")]
    pub watcher_prefix: String,

    /// Presence workload: the servers' --presence-grace-ms. A user must stay
    /// offline longer than it (--users / --churn-rate seconds between two
    /// transitions of a user) for every disconnect to be a transition; the
    /// loader refuses a rate that does not leave 200 ms beyond it.
    #[arg(long, default_value_t = 0)]
    pub presence_grace_ms: u64,

    /// Presence workload: once every watcher is ready, wait for SIGUSR1
    /// before churning (at most --connect-timeout), and once drained hold
    /// every connection until SIGTERM or SIGINT (at most --hold, default
    /// 120 s), so an orchestrator can read the servers around the window.
    #[arg(long)]
    pub wait_for_signal: bool,

    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,

    /// Write the JSON summary here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// No progress bar / progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// A validated target: where to connect and what to print.
#[derive(Debug, Clone)]
pub struct Target {
    /// As given (without a trailing slash), for the JSON output.
    pub display: String,
    /// The WebSocket endpoint, `ws://host:port/ws` (`/socket.io/` for the
    /// Socket.IO peer), without a query.
    pub endpoint: String,
}

impl Args {
    /// Checks ranges and combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |flag: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{flag} must be a positive number"))
            }
        };
        let share = |flag: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{flag} must be in [0, 1]"))
            }
        };
        if self.targets.is_empty() {
            return Err("--targets is empty".into());
        }
        if self.users < 2 {
            return Err("--users must be at least 2".into());
        }
        if self.conns_per_user == 0 || self.conns_per_user > 64 {
            return Err("--conns-per-user must be in 1..=64".into());
        }
        let slots = u64::from(self.users) * u64::from(self.conns_per_user);
        if slots > 1_000_000 {
            return Err("--users x --conns-per-user must stay at most 1000000".into());
        }
        valid_name_part("--user-prefix", &self.user_prefix)?;
        valid_name_part("--room-prefix", &self.room_prefix)?;
        positive("--rate", self.rate)?;
        positive("--duration", self.duration)?;
        positive("--connect-timeout", self.connect_timeout)?;
        positive("--max-p99-ms", self.max_p99_ms)?;
        if !(self.drain.is_finite() && self.drain >= 0.0) {
            return Err("--drain must be >= 0".into());
        }
        if !(self.warmup.is_finite() && self.warmup >= 0.0) {
            return Err("--warmup must be >= 0".into());
        }
        if !(self.settle.is_finite() && self.settle >= 0.0) {
            return Err("--settle must be >= 0".into());
        }
        if !(self.min_delivery > 0.0 && self.min_delivery <= 1.0) {
            return Err("--min-delivery must be in (0, 1]".into());
        }
        if let Some(l) = self.locality {
            share("--locality", l)?;
        }
        share("--room-share", self.room_share)?;
        if self.workload == Workload::Churn {
            positive("--churn-rate", self.churn_rate)?;
            if self.no_ack {
                return Err("--no-ack is not supported with --workload churn \
                            (churn loss accounting needs acks)"
                    .into());
            }
        }
        if self.find_max {
            positive("--start-rate", self.start_rate)?;
            if !(self.step_factor.is_finite() && self.step_factor > 1.0) {
                return Err("--step-factor must be > 1".into());
            }
            if self.max_steps == 0 {
                return Err("--max-steps must be at least 1".into());
            }
        }
        // The body must stay well under the server's default 64 KiB frame limit.
        if !(16..=60_000).contains(&self.body_bytes) {
            return Err("--body-bytes must be in 16..=60000".into());
        }
        let rate_cap = if self.find_max {
            self.start_rate * self.step_factor.powi(self.max_steps as i32 - 1)
        } else {
            self.rate
        };
        if (rate_cap.min(10_000_000.0)) * (self.duration + self.warmup) > 200_000_000.0 {
            return Err("--rate x --duration is too large (at most 2e8 messages per step)".into());
        }
        if self.threads == 0 || self.threads > 64 {
            return Err("--threads must be in 1..=64".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if self.workload.uses_rooms() {
            if self.rooms == 0 {
                return Err("--rooms must be at least 1".into());
            }
            if self.room_members < 2 {
                return Err("--room-members must be at least 2".into());
            }
            if self.room_members > self.users {
                return Err("--room-members cannot exceed --users".into());
            }
            if self.room_spread == Some(0) {
                return Err("--room-spread must be at least 1".into());
            }
        }
        if self.workload == Workload::Ingest {
            return Err(
                "--workload ingest is switchboard-bench's own (it produces the records and \
                 receives them itself); switchboard-load does not run it"
                    .into(),
            );
        }
        if self.workload == Workload::Connections {
            self.validate_connections()?;
        }
        if self.workload == Workload::Presence {
            self.validate_presence()?;
        }
        let auth = self.auth_mode()?;
        if self.protocol == Protocol::Socketio {
            if matches!(self.workload, Workload::Connections | Workload::Presence) {
                return Err(format!(
                    "--workload {} speaks Switchboard's protocol only",
                    self.workload
                ));
            }
            if !self.dm_store {
                return Err("--dm-store false speaks Switchboard's protocol only".into());
            }
            if auth == AuthMode::Jwt {
                return Err(
                    "--protocol socketio: the peer takes no JWT (no --auth jwt, \
                            no --jwt-secret)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The checks of the connections workload's own flags.
    fn validate_connections(&self) -> Result<(), String> {
        let positive = |flag: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{flag} must be a positive number"))
            }
        };
        positive("--reconnect-within", self.reconnect_within)?;
        positive("--reconnect-timeout", self.reconnect_timeout)?;
        if let Some(hold) = self.hold {
            positive("--hold", hold)?;
        }
        if self.conns_per_user > 16 {
            return Err(
                "--conns-per-user above 16 exceeds the server's default per-user limit".into(),
            );
        }
        for addr in &self.source_addrs {
            if !self.allow_remote && !addr.is_loopback() {
                return Err(format!(
                    "--source-addrs: {addr} is not a loopback address (127.0.0.0/8, ::1); \
                     pass --allow-remote to use another"
                ));
            }
        }
        for t in &self.reconnect_targets {
            parse_target(t.trim(), self.allow_remote)?;
        }
        Ok(())
    }

    /// The checks of the presence workload's own flags.
    fn validate_presence(&self) -> Result<(), String> {
        if !(self.churn_rate.is_finite() && self.churn_rate > 0.0) {
            return Err("--churn-rate must be a positive number".into());
        }
        if let Some(hold) = self.hold {
            if !(hold.is_finite() && hold > 0.0) {
                return Err("--hold must be a positive number".into());
            }
        }
        if self.conns_per_user != 1 {
            return Err("--workload presence: one connection per churning user".into());
        }
        valid_name_part("--watcher-prefix", &self.watcher_prefix)?;
        if self.watcher_prefix.is_empty()
            || self.user_prefix.starts_with(&self.watcher_prefix)
            || self.watcher_prefix.starts_with(&self.user_prefix)
        {
            return Err(
                "--watcher-prefix and --user-prefix must differ, neither a prefix of the other"
                    .into(),
            );
        }
        let w = self.watcher_instances.len() as u32;
        if w == 0 {
            return Err("--watcher-instances is empty".into());
        }
        if self
            .watcher_instances
            .iter()
            .enumerate()
            .any(|(i, v)| self.watcher_instances[..i].contains(v))
        {
            return Err("--watcher-instances: each index once".into());
        }
        if let Some(&i) = self
            .watcher_instances
            .iter()
            .find(|&&i| i >= self.targets.len())
        {
            return Err(format!(
                "--watcher-instances: {i} is not a target index (there are {} targets)",
                self.targets.len()
            ));
        }
        if self.watcher_conns == 0 || self.watcher_conns > 10_000 {
            return Err("--watcher-conns must be in 1..=10000".into());
        }
        // Every user may have all its watchers on one watcher instance.
        let per_instance = self.watcher_conns / w;
        if self.watchers_per_user > per_instance {
            return Err(format!(
                "--watchers-per-user {} needs at least that many watcher connections per watcher \
                 instance: --watcher-conns {} over {w} instance(s) gives {per_instance}",
                self.watchers_per_user, self.watcher_conns
            ));
        }
        // At most 1000 watched users per connection (the server's default
        // --max-watches-per-connection): the busiest connection watches at
        // most users x watchers-per-user / per-instance of them.
        let busiest = u64::from(self.users) * u64::from(self.watchers_per_user)
            / u64::from(per_instance.max(1))
            + 1;
        if busiest > 1000 {
            return Err(format!(
                "a watcher connection would watch about {busiest} users, more than the server's \
                 default 1000: add --watcher-conns"
            ));
        }
        let dwell_s = f64::from(self.users) / self.churn_rate;
        let grace_s = self.presence_grace_ms as f64 / 1000.0;
        if dwell_s <= grace_s + 0.2 {
            return Err(format!(
                "--users {} / --churn-rate {} leaves a user {dwell_s:.3} s in each state, not \
                 more than --presence-grace-ms {} + 200 ms: lower the rate or add users",
                self.users, self.churn_rate, self.presence_grace_ms
            ));
        }
        Ok(())
    }

    /// The pass rule of `--min-delivery` and `--max-p99-ms`.
    pub fn pass_rule(&self) -> PassRule {
        PassRule {
            min_delivery: self.min_delivery,
            max_p99_ms: self.max_p99_ms,
        }
    }

    /// The effective authentication mode.
    pub fn auth_mode(&self) -> Result<AuthMode, String> {
        match (self.auth, &self.jwt_secret) {
            (None, None) | (Some(AuthMode::None), None) => Ok(AuthMode::None),
            (None, Some(_)) | (Some(AuthMode::Jwt), Some(_)) => Ok(AuthMode::Jwt),
            (Some(AuthMode::Jwt), None) => Err("--auth jwt needs --jwt-secret".into()),
            (Some(AuthMode::None), Some(_)) => {
                Err("--jwt-secret given together with --auth none".into())
            }
        }
    }

    /// Parses and checks the targets (loopback only unless --allow-remote).
    pub fn parsed_targets(&self) -> Result<Vec<Target>, String> {
        let path = match self.protocol {
            Protocol::Switchboard => "/ws",
            Protocol::Socketio => crate::socketio::PATH,
        };
        self.targets
            .iter()
            .map(|t| parse_target_at(t.trim(), self.allow_remote, path))
            .collect()
    }
}

fn valid_name_part(flag: &str, s: &str) -> Result<(), String> {
    if s.len() > 40
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b))
    {
        return Err(format!(
            "{flag} must be at most 40 characters of [A-Za-z0-9_.:@-]"
        ));
    }
    Ok(())
}

/// Parses `ws://host[:port][/path]` (path `/ws` when none is given); only
/// loopback hosts unless `allow_remote`.
pub fn parse_target(raw: &str, allow_remote: bool) -> Result<Target, String> {
    parse_target_at(raw, allow_remote, "/ws")
}

/// [`parse_target`] with `default_path` when none is given.
fn parse_target_at(raw: &str, allow_remote: bool, default_path: &str) -> Result<Target, String> {
    let display = raw.trim_end_matches('/').to_owned();
    let rest = display.strip_prefix("ws://").ok_or_else(|| {
        format!("target {raw:?}: only ws:// URLs are supported (no TLS in the loader)")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if path.contains('?') || path.contains('#') {
        return Err(format!("target {raw:?}: no query or fragment, please"));
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("target {raw:?}: unterminated IPv6 address"))?;
        &v6[..end]
    } else {
        authority.split(':').next().unwrap_or("")
    };
    if host.is_empty() {
        return Err(format!("target {raw:?}: no host"));
    }
    if !allow_remote && !is_loopback_host(host) {
        return Err(format!(
            "target {raw:?}: host {host} is not loopback (127.0.0.0/8, ::1, localhost); \
             pass --allow-remote to load another machine"
        ));
    }
    let endpoint = if path.is_empty() || path == "/" {
        format!("ws://{authority}{default_path}")
    } else {
        format!("ws://{authority}{path}")
    };
    Ok(Target { display, endpoint })
}

fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.octets()[0] == 127,
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback()
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4: Ipv4Addr| v4.octets()[0] == 127)
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_only() {
        assert_eq!(
            parse_target("ws://127.0.0.1:8081", false).map(|t| t.endpoint),
            Ok("ws://127.0.0.1:8081/ws".to_owned())
        );
        assert!(parse_target("ws://127.1.2.3:1/", false).is_ok());
        assert!(parse_target("ws://localhost:1/ws", false).is_ok());
        assert!(parse_target("ws://[::1]:80", false).is_ok());
        assert!(parse_target("ws://10.0.0.1:8081", false).is_err());
        assert!(parse_target("ws://example.com:8081", false).is_err());
        assert!(parse_target("ws://127.0.0.1.evil.com:8081", false).is_err());
        assert!(parse_target("ws://10.0.0.1:8081", true).is_ok());
        assert!(parse_target("wss://127.0.0.1:8081", false).is_err());
        assert!(parse_target("http://127.0.0.1:8081", false).is_err());
    }

    #[test]
    fn socketio_targets_and_flags() {
        let parse = |extra: &[&str]| {
            let base = ["switchboard-load", "--protocol", "socketio"];
            Args::try_parse_from(base.iter().chain(extra))
                .map_err(|e| e.to_string())
                .and_then(|a| a.validate().map(|()| a))
        };
        let args =
            parse(&["--targets", "ws://127.0.0.1:3001,ws://127.0.0.1:3002/"]).expect("valid");
        let endpoints: Vec<String> = args
            .parsed_targets()
            .expect("loopback")
            .into_iter()
            .map(|t| t.endpoint)
            .collect();
        assert_eq!(
            endpoints,
            [
                "ws://127.0.0.1:3001/socket.io/",
                "ws://127.0.0.1:3002/socket.io/"
            ]
        );
        assert!(parse(&["--no-ack", "--workload", "room"]).is_ok());
        assert!(parse(&["--workload", "connections"]).is_err());
        assert!(parse(&["--jwt-secret", "s"]).is_err());
        assert!(parse(&["--dm-store", "false"]).is_err());
    }

    #[test]
    fn dm_store_defaults_to_true_and_takes_a_value() {
        let parse = |extra: &[&str]| {
            let base = ["switchboard-load"];
            Args::try_parse_from(base.iter().chain(extra))
                .map_err(|e| e.to_string())
                .and_then(|a| a.validate().map(|()| a.dm_store))
        };
        assert_eq!(parse(&[]), Ok(true));
        assert_eq!(parse(&["--dm-store", "false"]), Ok(false));
        assert_eq!(parse(&["--dm-store=true"]), Ok(true));
        assert!(parse(&["--dm-store"]).is_err());
        assert!(parse(&["--dm-store", "maybe"]).is_err());
    }

    #[test]
    fn presence_flags_are_checked() {
        let parse = |extra: &[&str]| {
            let base = [
                "switchboard-load",
                "--workload",
                "presence",
                "--targets",
                "ws://127.0.0.1:1,ws://127.0.0.1:2,ws://127.0.0.1:3,ws://127.0.0.1:4",
            ];
            Args::try_parse_from(base.iter().chain(extra))
                .map_err(|e| e.to_string())
                .and_then(|a| a.validate())
        };
        assert_eq!(parse(&[]), Ok(()));
        assert_eq!(parse(&["--churn-rate", "200", "--users", "200"]), Ok(()));
        // 200 users at 1000/s: 0.2 s per state, not more than 0 + 200 ms.
        assert!(parse(&["--churn-rate", "1000"]).is_err());
        assert!(parse(&["--churn-rate", "100", "--presence-grace-ms", "2000"]).is_err());
        assert!(parse(&["--watcher-instances", "0,4"]).is_err());
        assert!(parse(&["--watcher-instances", "1,1"]).is_err());
        assert!(parse(&["--watcher-conns", "15"]).is_err());
        assert!(parse(&["--watcher-prefix", "u"]).is_err());
        assert!(parse(&["--watcher-prefix", "u1"]).is_err());
        assert!(parse(&["--watchers-per-user", "0"]).is_ok());
        assert!(parse(&["--users", "5000", "--churn-rate", "10"]).is_err());
        assert!(parse(&["--protocol", "socketio"]).is_err());
    }

    #[test]
    fn connections_flags_stay_on_loopback() {
        let parse = |extra: &[&str]| {
            let base = ["switchboard-load", "--workload", "connections"];
            Args::try_parse_from(base.iter().chain(extra))
                .map_err(|e| e.to_string())
                .and_then(|a| a.validate())
        };
        assert!(parse(&["--source-addrs", "127.0.0.2,127.0.0.3"]).is_ok());
        assert!(parse(&["--reconnect-targets", "ws://127.0.0.1:1,ws://127.0.0.1:2"]).is_ok());
        assert!(parse(&["--source-addrs", "10.0.0.2"]).is_err());
        assert!(parse(&["--reconnect-targets", "ws://10.0.0.1:1"]).is_err());
        assert!(parse(&["--hold", "0"]).is_err());
        assert!(parse(&["--reconnect-within", "-1"]).is_err());
    }
}
