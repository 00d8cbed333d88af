//! The static shape of a run, fixed before anything connects: which instance
//! each connection slot goes to, each user's home instance, the recipient
//! pools for `--locality`, and room membership (`--rooms`, `--room-members`,
//! `--room-spread`).
//!
//! A connection *slot* is `user * conns_per_user + j`; it keeps its index
//! (and its sequence trackers) across churn reconnects.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::cli::{Args, Placement};

/// One room: the connection slots that join it.
#[derive(Debug, Clone)]
pub struct Room {
    /// Every connection slot of every member user.
    pub slots: Vec<u32>,
}

/// Placement of users, connections and rooms.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Number of users.
    pub users: u32,
    /// Connections per user.
    pub cpu: u32,
    /// Number of instances.
    pub n_inst: usize,
    /// Instance of each connection slot.
    pub slot_inst: Vec<u16>,
    /// Users homed (connection 0) on each instance.
    pub home_users: Vec<Vec<u32>>,
    /// Users homed elsewhere, per instance (only built with `--locality`).
    pub remote_users: Vec<Vec<u32>>,
    /// Rooms (empty unless the workload uses rooms).
    pub rooms: Vec<Room>,
    /// Rooms each slot joins.
    pub slot_rooms: Vec<Vec<u32>>,
}

impl Plan {
    /// Builds the plan for `args` over `n_inst` instances.
    pub fn build(args: &Args, n_inst: usize) -> Result<Plan, String> {
        let users = args.users;
        let cpu = args.conns_per_user;
        let n_slots = (users * cpu) as usize;
        let mut rng = SmallRng::seed_from_u64(args.seed ^ 0x5eed_91ac_e000_0001);
        let slot_inst: Vec<u16> = (0..n_slots)
            .map(|s| {
                let (u, j) = (s as u32 / cpu, s as u32 % cpu);
                let i = match args.placement {
                    Placement::RoundRobin => (u as usize + j as usize) % n_inst,
                    Placement::Random => rng.random_range(0..n_inst),
                };
                i as u16
            })
            .collect();
        let mut home_users = vec![Vec::new(); n_inst];
        for u in 0..users {
            home_users[slot_inst[(u * cpu) as usize] as usize].push(u);
        }
        let remote_users = if args.locality.is_some() {
            (0..n_inst)
                .map(|i| {
                    (0..n_inst)
                        .filter(|&k| k != i)
                        .flat_map(|k| home_users[k].iter().copied())
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut plan = Plan {
            users,
            cpu,
            n_inst,
            slot_inst,
            home_users,
            remote_users,
            rooms: Vec::new(),
            slot_rooms: vec![Vec::new(); n_slots],
        };
        if args.workload.uses_rooms() {
            plan.build_rooms(args)?;
        }
        Ok(plan)
    }

    /// Rooms: room r's members are homed on `spread` consecutive instances
    /// starting at r mod N, taken round-robin over those instances; a cursor
    /// per instance makes successive rooms use different users.
    fn build_rooms(&mut self, args: &Args) -> Result<(), String> {
        let n = self.n_inst;
        let spread = args.room_spread.map_or(n, |k| k as usize);
        if spread > n {
            return Err(format!(
                "--room-spread {spread} is more than the {n} targets"
            ));
        }
        let m = args.room_members as usize;
        let mut cursor = vec![0usize; n];
        for r in 0..args.rooms {
            let instances: Vec<usize> = (0..spread).map(|t| (r as usize + t) % n).collect();
            for (t, &inst) in instances.iter().enumerate() {
                let want = m / spread + usize::from(t < m % spread);
                let have = self.home_users[inst].len();
                if want > have {
                    return Err(format!(
                        "room {r}: {want} members should be homed on instance {inst}, \
                         which has only {have} users (raise --users or --room-spread)"
                    ));
                }
            }
            let mut members = Vec::with_capacity(m);
            for t in 0..m {
                let inst = instances[t % spread];
                let list = &self.home_users[inst];
                members.push(list[cursor[inst] % list.len()]);
                cursor[inst] += 1;
            }
            let mut slots = Vec::with_capacity(m * self.cpu as usize);
            for &u in &members {
                for j in 0..self.cpu {
                    let s = u * self.cpu + j;
                    slots.push(s);
                    self.slot_rooms[s as usize].push(r);
                }
            }
            self.rooms.push(Room { slots });
        }
        Ok(())
    }

    /// The user of a slot.
    pub fn user_of(&self, slot: u32) -> u32 {
        slot / self.cpu
    }

    /// Number of connection slots.
    pub fn n_slots(&self) -> usize {
        self.slot_inst.len()
    }

    /// Picks a DM recipient for a sender (never the sender's own user).
    /// Without `locality` the recipient is uniform over all other users (as
    /// the Socket.IO peer). With it, a share `p` is drawn from the users homed
    /// on the sender connection's instance, the rest from the others; when a
    /// pool has nobody but the sender, it falls back to uniform.
    pub fn pick_recipient(
        &self,
        rng: &mut SmallRng,
        sender_user: u32,
        sender_inst: usize,
        locality: Option<f64>,
    ) -> u32 {
        if let Some(p) = locality {
            let local = rng.random::<f64>() < p;
            let pool = if local {
                &self.home_users[sender_inst]
            } else {
                &self.remote_users[sender_inst]
            };
            // Is the sender itself in the pool? (Its home is connection 0's instance.)
            let home = self.slot_inst[(sender_user * self.cpu) as usize] as usize;
            let in_pool = (home == sender_inst) == local;
            if pool.len() > usize::from(in_pool) {
                loop {
                    let u = pool[rng.random_range(0..pool.len())];
                    if u != sender_user {
                        return u;
                    }
                }
            }
        }
        let r = rng.random_range(0..self.users - 1);
        if r >= sender_user {
            r + 1
        } else {
            r
        }
    }
}
