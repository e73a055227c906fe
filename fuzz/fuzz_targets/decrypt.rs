//! The encrypted-format decoder on arbitrary bytes: it must never panic, and whatever it
//! accepts must be exactly what was sealed (here: only well-formed inputs built from the
//! fuzz data itself can decrypt).
#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use panoptic_sync::crypto::{Decryptor, Encryptor, MasterKey};
use panoptic_sync::pipeline::{self, Plan};

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes([7; 32]);
    // 1. Arbitrary ciphertext, fed in arbitrary pieces.
    let mut d = Decryptor::new(vec![key.clone()], "x.zst.enc");
    let mut out = Vec::new();
    let split = data.first().map(|b| *b as usize + 1).unwrap_or(1);
    let mut ok = true;
    for piece in data.chunks(split) {
        if d.push(piece, &mut out).is_err() {
            ok = false;
            break;
        }
    }
    if ok {
        let _ = d.finish(&mut out);
    }
    // 2. The whole decode chain (decrypt, metadata record, zstd) on arbitrary bytes.
    let plan = Plan::from_key("x.zst.enc").0;
    if let Ok((mut r, _)) = pipeline::decoder(plan, std::slice::from_ref(&key), "x.zst.enc", data) {
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    }
    // 3. Round trip of the data as plaintext, with one byte flipped when there is one.
    let mut e = Encryptor::new(&key, "x.enc", Vec::new()).unwrap();
    e.write_all(data).unwrap();
    let mut sealed = e.finish().unwrap();
    assert_eq!(
        panoptic_sync::crypto::decrypt_all(vec![key.clone()], "x.enc", &sealed).unwrap(),
        data
    );
    let i = data.len() % sealed.len();
    sealed[i] ^= 1;
    assert!(panoptic_sync::crypto::decrypt_all(vec![key], "x.enc", &sealed).is_err());
});
