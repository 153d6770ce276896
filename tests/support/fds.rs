//! The open-files limit of the test process (children such as `mailferry serve` inherit it):
//! tests that hold thousands of sockets raise it first. Like `bench_imap`'s `prlimit`, but in
//! process and without root: the soft limit goes up to the hard one.

/// `struct rlimit` on Linux (`rlim_t` is 64 bits on every Linux target Rust supports).
#[repr(C)]
struct Rlimit {
    cur: u64,
    max: u64,
}

const RLIMIT_NOFILE: i32 = 7;

extern "C" {
    fn getrlimit(resource: i32, rlim: *mut Rlimit) -> i32;
    fn setrlimit(resource: i32, rlim: *const Rlimit) -> i32;
}

/// Raises the soft open-files limit to at least `want` where the hard limit allows; returns
/// the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = Rlimit { cur: 0, max: 0 };
    // SAFETY: getrlimit writes one `struct rlimit` into memory we own.
    if unsafe { getrlimit(RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.cur < want {
        let raised = Rlimit {
            cur: want.min(lim.max),
            max: lim.max,
        };
        // SAFETY: setrlimit reads one `struct rlimit` we own; lowering nothing.
        if unsafe { setrlimit(RLIMIT_NOFILE, &raised) } == 0 {
            lim.cur = raised.cur;
        }
    }
    lim.cur
}
