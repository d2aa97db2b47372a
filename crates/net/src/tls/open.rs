//! Opening TLS records into memory the reader has not initialised: the one place coloblk uses
//! `unsafe`.
//!
//! aws-lc-rs opens only into `&mut [u8]`, which must be initialised memory. The NBD server
//! reads a write's payload into a fresh buffer's spare capacity, so opening a record there
//! through aws-lc-rs first needs a zeroing pass over every byte (tokio's
//! `ReadBuf::initialize_unfilled_to`), which the cipher then overwrites: on the replica link,
//! the largest cost TLS had besides the cipher (docs/BENCHMARKS.md). Here aws-lc's
//! `EVP_AEAD_CTX_open_gather` writes the plaintext through a raw pointer instead, and the bytes
//! count as initialised only once it has written all of them.

use std::mem::MaybeUninit;
use std::ptr::NonNull;

use aws_lc_sys::{
    EVP_AEAD, EVP_AEAD_CTX, EVP_AEAD_CTX_free, EVP_AEAD_CTX_new, EVP_AEAD_CTX_open_gather,
    EVP_aead_aes_128_gcm, EVP_aead_aes_256_gcm, EVP_aead_chacha20_poly1305,
};
use tokio::io::ReadBuf;

/// The AEADs TLS 1.3 negotiates here.
#[derive(Clone, Copy, Debug)]
pub(super) enum Aead {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// Every TLS 1.3 AEAD's tag.
pub(super) const TAG: usize = 16;
/// Every TLS 1.3 AEAD's nonce (RFC 8446 5.3).
pub(super) const NONCE: usize = 12;

/// The record didn't authenticate (bad_record_mac).
#[derive(Debug)]
pub(super) struct Unauthentic;

/// One direction's key for opening records.
pub(super) struct OpeningKey(NonNull<EVP_AEAD_CTX>);

// SAFETY: an EVP_AEAD_CTX holds key material and no thread-local state; it is only read after
// `EVP_AEAD_CTX_new` (open_gather takes it `const`) and freed once, in `drop`. Moving it to
// another thread is sound.
unsafe impl Send for OpeningKey {}

impl OpeningKey {
    /// None: the key's length does not fit the AEAD.
    pub(super) fn new(aead: Aead, key: &[u8]) -> Option<OpeningKey> {
        // SAFETY: the EVP_aead_* functions take nothing and return pointers to static tables.
        let alg: *const EVP_AEAD = unsafe {
            match aead {
                Aead::Aes128Gcm => EVP_aead_aes_128_gcm(),
                Aead::Aes256Gcm => EVP_aead_aes_256_gcm(),
                Aead::Chacha20Poly1305 => EVP_aead_chacha20_poly1305(),
            }
        };
        // SAFETY: `alg` is a static table; `key` is valid for `key.len()` bytes and aws-lc copies
        // what it needs. A wrong length returns null, which `NonNull::new` turns into None.
        let ctx = unsafe { EVP_AEAD_CTX_new(alg, key.as_ptr(), key.len(), TAG) };
        NonNull::new(ctx).map(OpeningKey)
    }

    /// Opens `ciphertext` and `tag` into the next `ciphertext.len()` bytes of `out`'s unfilled
    /// part, initialised or not, and returns them; `out`'s filled part is left as it was. Panics
    /// if `out` has less room than that.
    pub(super) fn open_into<'a>(
        &self,
        nonce: &[u8; NONCE],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG],
        out: &'a mut ReadBuf<'_>,
    ) -> Result<&'a mut [u8], Unauthentic> {
        let n = ciphertext.len();
        let filled = out.filled().len();
        // SAFETY: the slice is only written through (by aws-lc, below), never de-initialised.
        let dst: &mut [MaybeUninit<u8>] = unsafe { &mut out.unfilled_mut()[..n] };
        // SAFETY: `dst` is valid for writes of n bytes and `ciphertext` for reads of n bytes,
        // and they do not overlap (one is borrowed shared, the other exclusively).
        let ok = unsafe {
            self.open_raw(
                nonce,
                aad,
                ciphertext.as_ptr(),
                n,
                tag,
                dst.as_mut_ptr().cast(),
            )
        };
        if !ok {
            return Err(Unauthentic);
        }
        // SAFETY: on success open_gather has written all n plaintext bytes of `dst`, the first
        // n unfilled bytes of `out`.
        unsafe { out.assume_init(n) };
        Ok(&mut out.initialized_mut()[filled..filled + n])
    }

    /// Opens the record body `sealed` (ciphertext, then the tag) where it is and returns the
    /// plaintext, its first `sealed.len() - TAG` bytes.
    pub(super) fn open_in_place<'a>(
        &self,
        nonce: &[u8; NONCE],
        aad: &[u8],
        sealed: &'a mut [u8],
    ) -> Result<&'a mut [u8], Unauthentic> {
        let n = sealed.len().checked_sub(TAG).ok_or(Unauthentic)?;
        let (text, tag) = sealed.split_at_mut(n);
        let tag = (&*tag).try_into().expect("TAG bytes");
        // One pointer for both, so that the input pointer is not invalidated by taking the output.
        let p = text.as_mut_ptr();
        // SAFETY: `p` is valid for reads and writes of n bytes, passed as both input and output
        // (in-place opening).
        let ok = unsafe { self.open_raw(nonce, aad, p.cast_const(), n, tag, p) };
        if !ok {
            return Err(Unauthentic);
        }
        Ok(text)
    }

    /// aws-lc's `EVP_AEAD_CTX_open_gather`: true when the record is authentic, and then all n
    /// bytes at `output` are written.
    ///
    /// # Safety
    ///
    /// `input` must be valid for reads and `output` for writes of n bytes, and the two either
    /// the same pointer (aws-lc allows opening exactly in place) or not overlapping.
    unsafe fn open_raw(
        &self,
        nonce: &[u8; NONCE],
        aad: &[u8],
        input: *const u8,
        n: usize,
        tag: &[u8; TAG],
        output: *mut u8,
    ) -> bool {
        // SAFETY: the caller vouches for `input` and `output`; nonce, tag and aad are valid for
        // their lengths; the context is live (freed only in `drop`).
        unsafe {
            EVP_AEAD_CTX_open_gather(
                self.0.as_ptr(),
                output,
                nonce.as_ptr(),
                NONCE,
                input,
                n,
                tag.as_ptr(),
                TAG,
                aad.as_ptr(),
                aad.len(),
            ) == 1
        }
    }
}

impl Drop for OpeningKey {
    fn drop(&mut self) {
        // SAFETY: the context came from EVP_AEAD_CTX_new and is freed only here.
        unsafe { EVP_AEAD_CTX_free(self.0.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce};
    use aws_lc_rs::aead::{Algorithm, UnboundKey};
    use tokio::io::ReadBuf;

    use super::*;

    /// Seals with aws-lc-rs, the reference, then opens with ours.
    fn sealed(alg: &'static Algorithm, key: &[u8], nonce: [u8; 12], plain: &[u8]) -> Vec<u8> {
        let k = LessSafeKey::new(UnboundKey::new(alg, key).unwrap());
        let mut v = plain.to_vec();
        k.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(b"hdr!!"),
            &mut v,
        )
        .unwrap();
        v
    }

    #[test]
    fn opens_what_aws_lc_rs_seals_into_uninitialised_memory_and_in_place() {
        let plain: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let nonce = [9u8; 12];
        for (alg, aead, klen) in [
            (&AES_128_GCM, Aead::Aes128Gcm, 16),
            (&AES_256_GCM, Aead::Aes256Gcm, 32),
            (&CHACHA20_POLY1305, Aead::Chacha20Poly1305, 32),
        ] {
            let key: Vec<u8> = (0..klen as u8).collect();
            let rec = sealed(alg, &key, nonce, &plain);
            let k = OpeningKey::new(aead, &key).unwrap();

            // Into a buffer with 3 bytes already filled and nothing initialised past them.
            let mut mem = [MaybeUninit::<u8>::uninit(); 1100];
            let mut out = ReadBuf::uninit(&mut mem);
            out.put_slice(b"abc");
            let (ct, tag) = rec.split_at(plain.len());
            let got = k
                .open_into(&nonce, b"hdr!!", ct, tag.try_into().unwrap(), &mut out)
                .unwrap();
            assert_eq!(got, &plain[..]);
            assert_eq!(out.filled(), b"abc", "opening does not fill");
            assert_eq!(out.initialized().len(), 3 + plain.len());

            let mut rec2 = rec.clone();
            let got = k.open_in_place(&nonce, b"hdr!!", &mut rec2).unwrap();
            assert_eq!(got, &plain[..]);
        }
    }

    #[test]
    fn refuses_a_flipped_bit_a_wrong_nonce_or_aad_and_a_bad_key_length() {
        let key = [1u8; 16];
        let nonce = [2u8; 12];
        let rec = sealed(&AES_128_GCM, &key, nonce, b"payload");
        let k = OpeningKey::new(Aead::Aes128Gcm, &key).unwrap();
        let mut flipped = rec.clone();
        flipped[3] ^= 0x10;
        assert!(k.open_in_place(&nonce, b"hdr!!", &mut flipped).is_err());
        assert!(
            k.open_in_place(&[3u8; 12], b"hdr!!", &mut rec.clone())
                .is_err()
        );
        assert!(k.open_in_place(&nonce, b"hdr!?", &mut rec.clone()).is_err());
        assert!(k.open_in_place(&nonce, b"hdr!!", &mut [0u8; 15]).is_err());

        let mut mem = [MaybeUninit::<u8>::uninit(); 64];
        let mut out = ReadBuf::uninit(&mut mem);
        let (ct, tag) = flipped.split_at(7);
        assert!(
            k.open_into(&nonce, b"hdr!!", ct, tag.try_into().unwrap(), &mut out)
                .is_err()
        );
        assert_eq!(out.initialized().len(), 0, "nothing counts as written");

        assert!(OpeningKey::new(Aead::Aes128Gcm, &[0u8; 15]).is_none());
        assert!(OpeningKey::new(Aead::Aes256Gcm, &[0u8; 16]).is_none());
    }
}
