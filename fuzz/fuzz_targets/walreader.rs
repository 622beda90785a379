//! The WAL reader on arbitrary bytes, fed in two pieces: no panic, no runaway allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use walvault_shared::lsn::Lsn;
use walvault_shared::walreader::WalReader;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cut = (data[0] as usize * 256 + data[1] as usize) % data.len();
    let mut r = WalReader::new(Lsn(1 << 20), 1 << 20);
    let _ = r.feed(&data[2..cut.max(2)]);
    let _ = r.feed(&data[cut.max(2)..]);
});
