//! Connection slots per source address: how many connections of one address are still before
//! login. The per-protocol counts are plain semaphores (`listener::Admission`); this is the
//! finer count that stops one host from filling them with connections that never log in.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

/// Counts of slots held, per source address.
#[derive(Debug)]
pub struct AddressSlots {
    max: usize,
    held: DashMap<IpAddr, usize>,
}

/// One slot of one address; given back when dropped (login or close).
#[derive(Debug)]
pub struct AddressSlot {
    owner: Arc<AddressSlots>,
    key: IpAddr,
}

/// The address a connection counts against: IPv4 (and IPv4-mapped IPv6) as is, other IPv6
/// by its /64, since one host is routinely given a whole /64 to pick addresses from.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl AddressSlots {
    /// At most `max` slots per address.
    pub fn new(max: usize) -> Arc<AddressSlots> {
        Arc::new(AddressSlots {
            max,
            held: DashMap::new(),
        })
    }

    /// A slot for a connection from `ip`, or `None` when its address holds `max` already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = key(ip);
        let mut count = self.held.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            owner: self.clone(),
            key,
        })
    }

    /// Slots held by `ip`'s address.
    pub fn held(&self, ip: IpAddr) -> usize {
        self.held.get(&key(ip)).map_or(0, |c| *c)
    }

    /// Addresses holding at least one slot (the map never keeps zero counts).
    pub fn addresses(&self) -> usize {
        self.held.len()
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Entry::Occupied(mut e) = self.owner.held.entry(self.key) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_max_slots_and_each_drop_frees_one() {
        let slots = AddressSlots::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = slots.try_acquire(a).unwrap();
        let second = slots.try_acquire(a).unwrap();
        assert!(slots.try_acquire(a).is_none());
        assert!(
            slots.try_acquire(b).is_some(),
            "other addresses are not affected"
        );
        drop(first);
        let third = slots.try_acquire(a).unwrap();
        assert_eq!(slots.held(a), 2);
        drop((second, third));
        assert_eq!(slots.held(a), 0);
        assert_eq!(slots.addresses(), 0, "no entry is left behind");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let slots = AddressSlots::new(1);
        let _one = slots
            .try_acquire("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        assert!(slots
            .try_acquire("2001:db8:1:2::ffff".parse().unwrap())
            .is_none());
        assert!(slots
            .try_acquire("2001:db8:1:3::1".parse().unwrap())
            .is_some());
        let _v4 = slots.try_acquire("192.0.2.7".parse().unwrap()).unwrap();
        assert!(slots
            .try_acquire("::ffff:192.0.2.7".parse().unwrap())
            .is_none());
    }
}
