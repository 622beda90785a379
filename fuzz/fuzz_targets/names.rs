//! Name parsers on arbitrary text: WAL file names, history files, LSNs, archive keys.
#![no_main]
use libfuzzer_sys::fuzz_target;
use walvault_shared::{archive::names, lsn::Lsn, wal};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    for shift in [20u32, 24, 30] {
        let size = 1u64 << shift;
        if let Ok(n) = wal::SegmentName::parse(s, size) {
            assert_eq!(n.file_name(size), s);
        }
        let _ = names::parse(s, size);
        let _ = wal::WalFileName::parse(s, size);
    }
    if let Ok(l) = s.parse::<Lsn>() {
        assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
    }
    if let Ok(h) = wal::TimelineHistory::parse(s) {
        let _ = wal::TimelineHistory::parse(&h.to_text()).unwrap();
    }
});
