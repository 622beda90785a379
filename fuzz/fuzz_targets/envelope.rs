//! The object envelope reader on arbitrary bytes: no panic, no allocation beyond what a
//! checksummed header promises (libFuzzer's -rss_limit_mb catches runaway allocation).
#![no_main]
use libfuzzer_sys::fuzz_target;
use walvault_shared::archive::envelope;

fuzz_target!(|data: &[u8]| {
    let _ = envelope::decode_header("fuzz", data);
    if let Ok(d) = envelope::decode("fuzz", data) {
        // Whatever decodes must re-encode to an object that decodes to the same content.
        let again = envelope::encode_raw(
            d.header.kind,
            &d.metadata,
            d.header.plain_len,
            d.header.plain_crc,
            envelope::Compression::None,
            &d.content,
        );
        assert_eq!(envelope::decode("fuzz", &again).unwrap().content, d.content);
    }
});
